"""`python -m nas.export results/<study>`: write one architecture of the front as a model folder.

Pick the trial with --best (the default: the smallest front member whose score is within one
standard error of the best score, the one-standard-error rule of model selection, the error
bootstrapped over the validation cases), --best-score (the highest score on the front),
--max-params P (highest score among front members with at most P parameters) or --trial N;
with --by cv, --best and --max-params choose among the members `nas retrain --folds`
cross-validated, by their mean over the folds (as nnU-Net's find_best_configuration does).
Its weights are chosen with --weights (default: wherever nas trained it longest; see
nas/search/weights.py). The folder
(default results/<study>/export/trial_NNNN) gets architecture.yaml, weights.pt, README.md,
and the formats asked for with --format: pt2 (torch.export, the default) and onnx. Each
exported program is run on a random input and compared with the eager model before the folder
is written; the largest difference is recorded. The folder is built beside its destination
and renamed into place. A folder holding a different model is only replaced with --force,
and only an empty folder or an earlier export is ever replaced: never a file, a link, a
folder with anything an export does not write, or the study's own results."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nas.commands.cli import command_parser, exit_code
from nas.core.errors import NasError
from nas.deploy.export_study import ExportedMember, export_chosen_ensemble, export_member
from nas.deploy.programs import FORMATS
from nas.deploy.readme import README_FILE
from nas.search.choice import choose_trial, one_standard_error
from nas.search.weights import KINDS, RETRAINED_BEST

if TYPE_CHECKING:
    import optuna


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("export", __doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/unet")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--best", action="store_true",
        help="the smallest front member within one standard error of the best score (default)",
    )  # fmt: skip
    choice.add_argument("--best-score", action="store_true", help="the highest score on the front")
    choice.add_argument("--max-params", type=int, metavar="P", help="best with at most P params")
    choice.add_argument("--trial", type=int, metavar="N", help="this trial")
    parser.add_argument(
        "--by", choices=["search", "cv"], default="search",
        help="--best and --max-params rank by the search's validation score (search) or by the "
        "cross-validated mean of nas retrain --folds (cv)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="default: results/<study>/export/trial_NNNN")
    parser.add_argument("--format", default="pt2", help="comma-separated: pt2, onnx (or none)")
    parser.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier export of a different model"
    )
    parser.add_argument(
        "--weights", choices=["auto", *KINDS, RETRAINED_BEST], default="auto",
        help="which weights: nas retrain --all-cases's, nas retrain's, the search's, or the "
        "fold ensemble of nas retrain --folds (auto: the first of these that exists); "
        "retrained-best: nas retrain's at its best validation epoch",
    )  # fmt: skip
    parser.add_argument(
        "--ensemble", choices=["folds", "members"],
        help="folds: every fold's weights from nas retrain --folds, averaged by predict (the "
        "same as --weights folds); members: the ensemble of different trials that nas retrain "
        "--folds chose out of fold, one model folder each",
    )  # fmt: skip
    parser.add_argument(
        "--tta", choices=["none", "mirror"], default="none",
        help="predict averages over mirrored inputs too (nnU-Net's test-time augmentation)",
    )  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip() and f.strip() != "none")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise NasError("--format", f"unknown format {unknown[0]!r} (choose from pt2, onnx)")
    return formats


def _run_members(args: argparse.Namespace, study: optuna.Study, formats: Sequence[str]) -> int:
    """--ensemble members: the ensemble nas retrain --folds chose out of fold."""
    if args.trial is not None or args.max_params is not None:
        raise NasError(
            "--ensemble members",
            "exports the ensemble chosen out of fold; drop --trial and --max-params",
        )
    exported = export_chosen_ensemble(study, args.results, args.out, formats, args.storage,
                                      args.weights, args.force, args.tta)  # fmt: skip
    print(
        f"exported the ensemble of trials {', '.join(str(t.number) for t in exported.trials)} "
        f"(out-of-fold IoU {exported.chosen['oof_iou']:.4f}) to {exported.out}/"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from nas.search.study import load_results_study

    formats = parse_formats(args.format)
    if args.ensemble == "folds" and args.weights not in ("auto", "folds"):
        raise NasError(
            "--weights", f"--ensemble folds exports the folds' weights, not the {args.weights}'s"
        )
    study = load_results_study(args.results, args.storage)
    if args.ensemble == "members":
        return _run_members(args, study, formats)
    trial = choose_trial(study, args.trial, args.max_params, args.by, args.best_score)
    wanted = "folds" if args.ensemble == "folds" else args.weights
    exported = export_member(study, args.results, trial, wanted, args.out, formats, args.storage,
                             args.force, args.tta)  # fmt: skip
    _print_exported(args, study, trial.number, exported, formats)
    return 0


def _print_exported(
    args: argparse.Namespace, study: optuna.Study, number: int, exported: ExportedMember,
    formats: Sequence[str],
) -> None:  # fmt: skip
    """What was exported where, how it was chosen, and how far its programs are from eager."""
    from nas.network.model_card import CARD_FILE, WEIGHTS_FILE

    card, weights = exported.card, exported.weights
    files = [WEIGHTS_FILE, *(f"model.{f}" for f in formats)]
    if card.members:
        files = [f"{{{','.join(card.members)}}}/{{{','.join(files)}}}"]
    chosen_by = "chosen by cross-validation; " if args.by == "cv" and args.trial is None else ""
    print(
        f"exported trial {number} ({chosen_by}{card.source['n_params']:,} params, "
        f"IoU {card.source['val_iou']:.4f}) with its {weights.kind} weights ({weights.path}) "
        f"to {exported.out}/: " + ", ".join([CARD_FILE, *files, README_FILE])
    )
    if card.postprocessing.largest_component:
        print(
            "  postprocessing: largest connected component of "
            + ", ".join(card.postprocessing.largest_component)
        )
    if args.trial is None and args.max_params is None and args.by == "search":
        print("  " + _why_chosen(study, number, args.best_score))
    for name, difference in card.source["max_abs_difference_from_eager"].items():
        print(f"  {name}: max |difference| from the eager model {difference:.2e}")


def _why_chosen(study: optuna.Study, number: int, best_score: bool) -> str:
    """The line that says how --best or --best-score chose."""
    best, chosen, intervals = one_standard_error(study)

    def scored(n: int) -> str:
        known = intervals.get(n)
        return f"trial {n} ({known.score:.4f} +- {known.se:.4f})" if known else f"trial {n}"

    if best_score:
        other = "" if chosen == best else f"; --best would take {scored(chosen)}"
        return f"chosen by the highest score: {scored(best)}{other}"
    if chosen == best:
        return f"chosen: {scored(best)}, the best score, and no smaller member within its error"
    return (
        f"chosen by the one-standard-error rule: {scored(chosen)}, the smallest front member "
        f"whose score reaches the best, {scored(best)}, within the standard error of their "
        f"difference over the validation cases; --best-score exports trial {best}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
