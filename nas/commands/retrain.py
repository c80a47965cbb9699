"""`python -m nas.retrain results/<study>`: retrain chosen front members at the full budget.

The search trains each candidate briefly (a few epochs, a wall-clock budget, perhaps a few
slices per case). This command takes members of the Pareto front, trains them again with
more epochs, no time limit and every training slice, and records each result as a trial of
its own study, `<study>-retrain`, in the same storage, labelled with the trial it came from.
The search's own values are never touched. Weights go to results/<study>/retrained/: the
final ones, and those of the epoch with the best validation IoU (trial_NNNN.best.pt).

A retrain runs for --epochs of --batches-per-epoch steps (nnU-Net: 1000 of 250), prints a
line per epoch, and writes a checkpoint every --checkpoint-every epochs and at the end
(trial_NNNN.latest.pt, nas/training/resumable.py). After a crash or a kill, the same command with
--continue goes on from each member's checkpoint and ends with the steps of a run never
stopped; a checkpoint of another trial or of other settings is refused.

With `--all-cases`, each chosen member is trained once more on every training case, the
validation fold's too, for the epochs it reached in the search (or --epochs), with nothing
left to validate on: nnU-Net's fold "all", the model to ship once cross-validation has chosen.
Its weights go to results/<study>/retrained/all_cases/ and nas export takes them first.

With `--folds`, each chosen member is instead cross-validated (nas.evaluation.crossval): trained on
every fold, recorded in `<study>-crossval`, summarised as mean +- sd per member in
results/<study>/crossval.csv with the postprocessing the out-of-fold predictions chose; where
the dataset has held-out test cases, the fold ensemble with and without mirroring is scored
on them next to a single fold's model, with its inference time (results/<study>/ensemble.csv).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nas.commands.cli import (
    add_device_option,
    add_processes_option,
    command_parser,
    device_option,
    exit_code,
    pool_option,
    processes_option,
)
from nas.core.errors import NasError
from nas.evaluation.retrain_plan import CHECKPOINT_EVERY, RetrainOptions

if TYPE_CHECKING:
    from nas.search.trial_files import TrialFiles


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("retrain", __doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/unet")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--top", type=int, default=3, help="the K front members of highest IoU")
    choice.add_argument("--trials", help="comma-separated trial numbers, e.g. 3,15")
    parser.add_argument("--epochs", type=int, help="epochs (default: 3x the search's)")
    parser.add_argument(
        "--batches-per-epoch", type=int, metavar="B",
        help="optimiser steps per epoch (default: the search's)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-every", type=int, metavar="N",
        help=f"epochs between checkpoints (default {CHECKPOINT_EVERY}; one at the end as well)",
    )  # fmt: skip
    parser.add_argument(
        "--continue", dest="continue_run", action="store_true",
        help="go on from each member's last checkpoint to the end its run was started for",
    )  # fmt: skip
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


def run(args: argparse.Namespace) -> int:
    from nas.data import DataConfig, load_dataset
    from nas.evaluation.all_cases import run_all_cases
    from nas.evaluation.crossval_run import run_crossval
    from nas.evaluation.retrain import run_retrain
    from nas.evaluation.retrain_plan import choose_trials, run_plan
    from nas.search.record import StudyRecord
    from nas.search.study import default_storage, load_results_study
    from nas.search.trial_files import trial_files

    processes = processes_option(args.processes)
    pool_option("--workers", args.workers)  # folds trained at once
    storage = args.storage or default_storage(args.results)
    # Its companion studies are written into the search's storage: only one that holds it.
    study = load_results_study(args.results, args.storage, access="existing")
    name = study.study_name
    # What this command trains and reads, shared through the study's artifact store when
    # it has one: every workflow writes and finds the trial files through it.
    options = _options(args, trial_files(study, args.results))
    recorded = StudyRecord.of(study).data_config
    if recorded is None:
        raise NasError(storage, f"study {name!r} does not record its data settings")
    data_cfg = DataConfig(**recorded)
    if args.all_cases and args.folds is not None:
        raise NasError("--all-cases", "trains one model on every case; --folds one per fold")
    for option in ("epochs", "batches_per_epoch", "checkpoint_every", "top"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise NasError(f"--{option.replace('_', '-')}", f"must be at least 1, not {value}")
    if args.folds is not None:
        _refuse_with_folds(args)
    chosen = choose_trials(study, args.top, args.trials)
    if args.folds is None:  # every member's settings and checkpoint checked before training
        for trial in chosen:
            run_plan(options, study, trial, data_cfg)
    load_dataset(data_cfg, processes=processes)  # built here if another machine searched
    device = device_option(args.device)  # torch: once the trials are found
    if args.folds is not None:
        return run_crossval(options, study, chosen, data_cfg, storage, device)
    try:
        if args.all_cases:
            return run_all_cases(options, study, chosen, data_cfg, storage, device)
        return run_retrain(options, study, chosen, data_cfg, storage, device)
    except KeyboardInterrupt:  # Ctrl-C: the same command afresh would start over
        print("interrupted: the same command with --continue goes on from each member's "
              "last checkpoint", file=sys.stderr)  # fmt: skip
        return 130


def _options(args: argparse.Namespace, files: TrialFiles) -> RetrainOptions:
    return RetrainOptions(
        results=args.results,
        files=files,
        epochs=args.epochs,
        batches_per_epoch=args.batches_per_epoch,
        checkpoint_every=args.checkpoint_every,
        continue_run=args.continue_run,
        all_cases=args.all_cases,
        folds=args.folds,
        workers=args.workers,
    )


def _refuse_with_folds(args: argparse.Namespace) -> None:
    given = {
        "--batches-per-epoch": args.batches_per_epoch is not None,
        "--checkpoint-every": args.checkpoint_every is not None,
        "--continue": args.continue_run,
    }
    for option, is_given in given.items():
        if is_given:
            raise NasError(
                option,
                "applies to nas retrain and --all-cases, not to --folds (which continues by "
                "itself: a fold already recorded is not trained again)",
            )


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
