"""`python -m nas.retrain results/<study>`: retrain chosen front members at the full budget.

The search trains each candidate briefly (a few epochs, a wall-clock budget, perhaps a few
slices per case). This command takes members of the Pareto front, trains them again with
more epochs, no time limit and every training slice, and records each result as a trial of
its own study, `<study>-retrain`, in the same storage, labelled with the trial it came from.
The search's own values are never touched. Weights go to results/<study>/retrained/.

With `--all-cases`, each chosen member is trained once more on every training case, the
validation fold's too, for the epochs it reached in the search (or --epochs), with nothing
left to validate on: nnU-Net's fold "all", the model to ship once cross-validation has chosen.
Its weights go to results/<study>/retrained/all_cases/ and nas export takes them first.

With `--folds`, each chosen member is instead cross-validated (nas.crossval): trained on
every fold, recorded in `<study>-crossval`, summarised as mean +- sd per member in
results/<study>/crossval.csv with the postprocessing the out-of-fold predictions chose; where
the dataset has held-out test cases, the fold ensemble with and without mirroring is scored
on them next to a single fold's model, with its inference time (results/<study>/ensemble.csv).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nas.cli import (
    add_device_option,
    add_processes_option,
    command_parser,
    device_option,
    exit_code,
    processes_option,
)
from nas.errors import NasError
from nas.staging import atomic_write
from nas.weights import all_cases_dir, retrained_dir

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.data import Case, DataConfig, Dataset


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("retrain", __doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/unet")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--top", type=int, default=3, help="the K front members of highest IoU")
    choice.add_argument("--trials", help="comma-separated trial numbers, e.g. 3,15")
    parser.add_argument("--epochs", type=int, help="epochs (default: 3x the search's)")
    parser.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")
    parser.add_argument(
        "--folds", help="cross-validate on these folds of the search's split: all, or e.g. 0,1"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="folds trained at once, in processes (--folds)"
    )
    parser.add_argument(
        "--all-cases", action="store_true",
        help="train the final model on every training case, none held for validation, for the "
        "epochs the search trained it (or --epochs)",
    )  # fmt: skip
    add_device_option(parser)
    add_processes_option(parser)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def parse_folds(text: str, data: DataConfig) -> list[int]:
    from nas.crossval import all_folds

    available = all_folds(data)
    if text == "all":
        return available
    try:
        folds = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise NasError("--folds", f"give 'all' or fold numbers such as 0,1, not {text!r}") from None
    missing = [f for f in folds if f not in available]
    if missing:
        raise NasError(
            "--folds", f"fold {missing[0]} does not exist (the split has folds 0-{available[-1]})"
        )
    return folds


def run_crossval(
    args: argparse.Namespace,
    study: optuna.Study,
    chosen: list[FrozenTrial],
    data_cfg: DataConfig,
    storage: str,
    device: torch.device,
) -> int:
    import pandas as pd

    from nas.companions import open_crossval_study, summary_rows
    from nas.crossval import cross_validate, record_ensemble
    from nas.data import load_dataset
    from nas.data.test_split import find_test_split
    from nas.heldout import compare_ensemble
    from nas.record import StudyRecord, study_objectives
    from nas.report import write_report
    from nas.storage import open_storage, redact
    from nas.weights import fold_path

    folds = parse_folds(args.folds, data_cfg)
    if args.workers < 1:
        raise NasError("--workers", f"must be at least 1, not {args.workers}")
    objectives = study_objectives(study).names
    crossval = open_crossval_study(open_storage(storage), study.study_name, objectives)
    cross_validate(study, chosen, folds, args.results, crossval, args.epochs, device, args.workers)
    table = pd.DataFrame(summary_rows(crossval, study))
    atomic_write(args.results / "crossval.csv", lambda p: table.to_csv(p, index=False))
    for row in table.itertuples():
        sd = "" if pd.isna(row.cv_iou_sd) else f" +- {row.cv_iou_sd:.4f}"
        print(
            f"trial {row.trial}: IoU {row.cv_iou_mean:.4f}{sd} over folds {row.folds} "
            f"(search: {row.search_val_iou:.4f}); largest component: "
            f"{row.largest_component or 'not applied'}"
        )
    chosen_ensemble = _choose_member_ensemble(args, study, crossval, table, folds, device)
    dataset = load_dataset(data_cfg)
    split = find_test_split(data_cfg, dataset)
    if split is not None and len(folds) > 1:
        postprocessing = StudyRecord.of(crossval).postprocessing
        rows = []
        for trial in chosen:
            weights = {f"fold_{f}": fold_path(args.results, trial.number, f) for f in folds}
            single = f"fold_{data_cfg.fold if data_cfg.fold in folds else folds[0]}"
            compared = compare_ensemble(
                study, trial, weights, single, split, device,
                postprocessing.get(str(trial.number), []),
            )  # fmt: skip
            record_ensemble(crossval, trial.number, compared)
            rows += compared
        if chosen_ensemble is not None and chosen_ensemble["n_members"] > 1:
            rows.append(_score_member_ensemble(study, args.results, chosen_ensemble, split, device))
            record_ensemble(crossval, -1, rows[-1:])
        ensemble = pd.DataFrame(rows)
        atomic_write(args.results / "ensemble.csv", lambda p: ensemble.to_csv(p, index=False))
        print(ensemble.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    report = write_report(study, args.results)
    print(
        f"recorded in study {crossval.study_name!r} of {redact(storage)}, "
        f"{args.results}/crossval.csv and {report}"
    )
    return 0


def _retrain_study(study: optuna.Study, storage: str) -> optuna.Study:
    """`<study>-retrain` in the search's storage, with the search's objectives."""
    from nas.companions import open_retrain_study
    from nas.record import study_objectives
    from nas.storage import open_storage

    return open_retrain_study(
        open_storage(storage), study.study_name, study_objectives(study).names
    )


def run_all_cases(
    args: argparse.Namespace,
    study: optuna.Study,
    chosen: list[FrozenTrial],
    data_cfg: DataConfig,
    storage: str,
    device: torch.device,
) -> int:
    from nas.data import load_dataset
    from nas.record import TrialRecord, merge_study
    from nas.results import save_checkpoint
    from nas.storage import redact
    from nas.train import CandidateFailed, fit, initial_model
    from nas.train_config import TrainConfig
    from nas.unet_config import UNetConfig

    dataset = load_dataset(data_cfg)
    slicing = dataclasses.replace(data_cfg.slicing, per_case=None)
    retrain_study = _retrain_study(study, storage)
    failed = 0
    for trial in chosen:
        record = TrialRecord.of(trial)
        unet = UNetConfig.from_dict(record.unet_config)
        search_train = TrainConfig(**record.train_config)
        epochs = args.epochs or record.epochs_run or search_train.epochs
        train = dataclasses.replace(search_train, epochs=epochs, max_seconds=None)
        print(
            f"training trial {trial.number} on all {len(dataset.cases)} cases for {epochs} epochs"
        )
        try:
            model = initial_model(unet, train)
            result = fit(model, dataset.cases, (), dataset.scheme, train, device, None, slicing)
        except CandidateFailed as failure:
            print(f"  trial {trial.number}: failed ({failure.reason})")
            failed += 1
            continue
        path = save_checkpoint(all_cases_dir(args.results), trial.number, model.state_dict())
        recorded = {
            "epochs_run": len(result.history),
            "cases": len(dataset.cases),
            "seconds": round(result.seconds, 2),
            "train_loss": result.history[-1].train_loss,
            "device": str(device),
        }
        merge_study(retrain_study, "all_cases", {str(trial.number): recorded})
        print(f"  trial {trial.number}: {path} (final training loss "
              f"{result.history[-1].train_loss:.4f})")  # fmt: skip
    print(f"recorded in study {retrain_study.study_name!r} of {redact(storage)}")
    return 1 if failed == len(chosen) else 0


def _choose_member_ensemble(
    args: argparse.Namespace,
    study: optuna.Study,
    crossval: optuna.Study,
    table,
    folds: list[int],
    device: torch.device,
) -> dict | None:
    """With two or more members cross-validated on every fold asked for: each member alone
    and the ensembles of the best 2 and 3, scored out of fold, the best chosen
    (results/<study>/member_ensembles.csv, and the crossval study for nas export)."""
    import pandas as pd

    from nas.member_ensemble import record, score_out_of_fold

    complete = [r for r in table.itertuples() if len(str(r.folds).split()) == len(folds)]
    if len(complete) < 2 or len(folds) < 2:
        return None
    ranked = [r.trial for r in sorted(complete, key=lambda r: -r.cv_iou_mean)]
    rows, chosen = score_out_of_fold(study, ranked, folds, args.results, device)
    record(crossval, rows, chosen)
    frame = pd.DataFrame(rows)
    atomic_write(args.results / "member_ensembles.csv", lambda p: frame.to_csv(p, index=False))
    print("out of fold, members and their ensembles:")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    how = "alone" if chosen["n_members"] == 1 else "(nas export --ensemble members)"
    print(f"chosen: {chosen['members']} {how}")
    return chosen


def _score_member_ensemble(
    study: optuna.Study, results: Path, chosen: dict, split, device: torch.device
) -> dict:
    """The chosen ensemble of different members on the held-out cases, exported and
    predicted as a user would (each member with the weights nas export takes by default)."""
    import tempfile

    from nas.export import export_members
    from nas.heldout import score_member_ensemble
    from nas.member_ensemble import chosen_trials

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    trials = [by_number[n] for n in chosen_trials(chosen)]
    with tempfile.TemporaryDirectory(prefix="nas-members-") as scratch:
        folder = Path(scratch) / "ensemble"
        export_members(study, results, trials, folder, (), "", "folds", False, "none",
                       chosen["largest_component"].split())  # fmt: skip
        scores = score_member_ensemble(folder, split, device)
    return {"trial": chosen["members"], "variant": "members' fold ensembles", **scores}


def choose_trials(study: optuna.Study, top: int, numbers: str | None) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    from nas.record import TrialRecord
    from nas.results import pareto_front

    if numbers is None:
        front = pareto_front(study)
        if not front:
            raise NasError(study.study_name, "has no completed trial to retrain")
        return sorted(front, key=lambda t: -(TrialRecord.of(t).iou or 0.0))[:top]
    by_number = {t.number: t for t in study.trials}
    chosen = []
    for text in numbers.split(","):
        try:
            trial = by_number[int(text)]
        except (ValueError, KeyError):
            raise NasError(
                "--trials", f"study {study.study_name!r} has no trial {text!r}"
            ) from None
        if trial.state != TrialState.COMPLETE:
            raise NasError("--trials", f"trial {trial.number} is {trial.state.name}, not COMPLETE")
        chosen.append(trial)
    return chosen


def run(args: argparse.Namespace) -> int:
    from nas.data import DataConfig, load_dataset
    from nas.record import StudyRecord
    from nas.study import default_storage, load_results_study

    processes = processes_option(args.processes)
    name = args.results.name
    storage = args.storage or default_storage(args.results)
    study = load_results_study(args.results, args.storage)
    recorded = StudyRecord.of(study).data_config
    if recorded is None:
        raise NasError(storage, f"study {name!r} does not record its data settings")
    data_cfg = DataConfig(**recorded)
    if args.all_cases and args.folds is not None:
        raise NasError("--all-cases", "trains one model on every case; --folds one per fold")
    if args.epochs is not None and args.epochs < 1:
        raise NasError("--epochs", f"must be at least 1, not {args.epochs}")
    if args.top < 1:
        raise NasError("--top", f"must be at least 1, not {args.top}")
    chosen = choose_trials(study, args.top, args.trials)
    load_dataset(data_cfg, processes=processes)  # built here if another machine searched
    device = device_option(args.device)  # torch: once the trials are found
    if args.folds is not None:
        return run_crossval(args, study, chosen, data_cfg, storage, device)
    if args.all_cases:
        return run_all_cases(args, study, chosen, data_cfg, storage, device)
    return run_retrain(args, study, chosen, data_cfg, storage, device)


def run_retrain(
    args: argparse.Namespace,
    study: optuna.Study,
    chosen: list[FrozenTrial],
    data_cfg: DataConfig,
    storage: str,
    device: torch.device,
) -> int:
    """Train each chosen member again on the search's split for longer (3x the search's
    epochs, or --epochs), recorded in the retrain study and retrained.csv."""
    import pandas as pd

    from nas.data import load_dataset, split_dataset
    from nas.storage import redact

    dataset = load_dataset(data_cfg)
    train_cases, val_cases = split_dataset(dataset, data_cfg)
    retrain_study = _retrain_study(study, storage)
    rows = []
    for trial in chosen:
        row = _retrain_one(args, study, retrain_study, trial, dataset, (train_cases, val_cases),
                           data_cfg, device)  # fmt: skip
        if row is not None:
            rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write(args.results / "retrained.csv", lambda p: table.to_csv(p, index=False))
    print(
        f"recorded in study {retrain_study.study_name!r} of {redact(storage)} "
        f"and {args.results}/retrained.csv"
    )
    return 0


def _retrain_one(
    args: argparse.Namespace,
    study: optuna.Study,
    retrain_study: optuna.Study,
    trial: FrozenTrial,
    dataset: Dataset,
    cases: tuple[list[Case], list[Case]],
    data_cfg: DataConfig,
    device: torch.device,
) -> dict | None:
    """One member retrained and recorded: its row of retrained.csv, or None when it failed
    (recorded as a FAIL, as nas.run would)."""
    from optuna.trial import TrialState, create_trial

    from nas.builder import count_parameters
    from nas.record import TrialRecord, carried, rerun_trial, study_objectives
    from nas.results import save_checkpoint
    from nas.train import CandidateFailed, fit, init_model, initial_model
    from nas.train_config import TrainConfig
    from nas.unet_config import UNetConfig

    record = TrialRecord.of(trial)
    unet = UNetConfig.from_dict(record.unet_config)
    search_train = TrainConfig(**record.train_config)
    epochs = args.epochs or 3 * search_train.epochs
    train = dataclasses.replace(search_train, epochs=epochs, max_seconds=None)
    n_params = count_parameters(init_model(unet, train.seed))
    print(f"retraining trial {trial.number} ({n_params:,} params) for {epochs} epochs")
    # Every training slice: the search may have used a few per case.
    slicing = dataclasses.replace(data_cfg.slicing, per_case=None)
    try:
        model = initial_model(unet, train)
        result = fit(model, *cases, dataset.scheme, train, device, None, slicing)
    except CandidateFailed as failure:  # as nas.run: the trial fails, the others go on
        attrs = carried(source_trial=trial.number, fail_reason=failure.reason)
        retrain_study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=attrs))
        print(f"  trial {trial.number}: failed ({failure.reason})")
        return None
    save_checkpoint(retrained_dir(args.results), trial.number, model.state_dict())
    scores = {"iou": result.scores.iou, "dice": result.scores.dice, "params": n_params}
    attrs = carried(
        source_trial=trial.number,
        search_val_iou=record.iou,
        epochs_run=len(result.history),
        seconds=round(result.seconds, 2),
        unet_config=unet.to_dict(),
        train_config=dataclasses.asdict(train),
        device=str(device),
    )
    curve = {e.epoch: e.scores.iou for e in result.history}
    objectives = study_objectives(study).names
    retrain_study.add_trial(rerun_trial(trial, scores, objectives, attrs, curve))
    print(f"  trial {trial.number}: IoU {record.iou:.3f} -> {result.scores.iou:.3f}")
    return {
        "trial": trial.number,
        "n_params": n_params,
        "search_val_iou": record.iou,
        "retrained_val_iou": result.scores.iou,
        "retrained_val_dice": result.scores.dice,
        "epochs": len(result.history),
        "seconds": round(result.seconds, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
