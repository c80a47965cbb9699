"""`python -m nas.run SPACE.yaml`: start or resume a search and keep results/<study>/ current.

The command line of the search: parse and check the options, then run `nas.search.run.search`
with its output copied into run.log, handing it what it uses from above the search (the
`--device` option, the report, the held-out scoring), and map user mistakes to one message
and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
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
from nas.search.interrupts import catch_interrupts
from nas.search.run_hooks import RunHooks
from nas.search.workers import STORAGE_ENV

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.data.test_split import TestSplit
    from nas.search.candidate_state import TrainingData


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _count(text: str) -> int:
    """A number of processes to start: 0 or more (at most what `check_pool_options` lets)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def check_pool_options(args: argparse.Namespace) -> None:
    """--workers, --threads and --data-workers within what the machine can run
    (nas.commands.cli.pool_option), or a NasError naming the option."""
    pool_option("--workers", args.workers)
    pool_option("--threads", args.threads)
    pool_option("--data-workers", args.data_workers, minimum=0)


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "run",
        "Search U-Net architectures: a Pareto front of validation IoU vs parameters. "
        "Running the same command again continues the same study.",
    )
    _add_search_options(parser)
    _add_storage_options(parser)
    _add_machine_options(parser)
    _add_mode_options(parser)
    return parser


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    """What to search, for how long, on which data, under which name."""
    parser.add_argument("space", type=Path, help="search-space YAML, e.g. search_spaces/unet.yaml")
    parser.add_argument(
        "--n-trials", type=_positive_int, help="finished trials the study should reach in total"
    )
    parser.add_argument(
        "--timeout", type=_positive_float,
        help="seconds for this run: the search plans its budget to end within them",
    )  # fmt: skip
    parser.add_argument(
        "--budget", type=_positive_int,
        help="total optimiser steps the study may train over all candidates and rungs",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", dest="settings",
        help="override a YAML entry, e.g. --set train.epochs=3 (repeatable; values are YAML)",
    )  # fmt: skip
    parser.add_argument(
        "--data", type=Path, help="dataset folder instead of data.path (no synthetic data)"
    )
    parser.add_argument("--study-name", help="study name (default: study.name in the YAML)")


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    """Where the study, its trial files and its results go."""
    parser.add_argument(
        "--storage",
        default=os.environ.get(STORAGE_ENV) or None,
        help=f"Optuna storage URL (default: ${STORAGE_ENV}, else "
        "sqlite:///RESULTS_DIR/NAME/study.db)",
    )
    parser.add_argument(
        "--artifacts", metavar="URL",
        help="where trial files go so that every host of the study finds them: a folder "
        "every host mounts, or s3://BUCKET/PREFIX (default: study.artifacts in the YAML, "
        "else each host's results folder); recorded in the study",
    )  # fmt: skip
    parser.add_argument(
        "--results-dir", type=Path, default=Path("results"),
        help="where the study's folder (RESULTS_DIR/NAME) goes (default: results)",
    )  # fmt: skip


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    """The device, the seed, and the processes and threads the run uses on this machine."""
    add_device_option(parser)
    parser.add_argument("--seed", type=int, help="sampler and training seed")
    parser.add_argument(
        "--workers", type=_positive_int, default=1,
        help="worker processes on this machine sharing the study (one per GPU when present)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=_positive_int, help="torch CPU threads per worker (default: split)"
    )
    add_processes_option(parser)
    parser.add_argument(
        "--data-workers", type=_count,
        help="background processes building each worker's training batches (0: on the "
        "training thread; default: the cores a GPU machine leaves, 1 on 2 or more CPU cores)",
    )  # fmt: skip


def _add_mode_options(parser: argparse.ArgumentParser) -> None:
    """Resuming with a changed space, a dry run, how much it prints; a worker's index."""
    parser.add_argument(
        "--extend-space", action="store_true",
        help="resume a study with a changed search space (same data; each parameter drawn "
        "so far must keep a compatible distribution)",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true",
        help="check space and data, build the cache, print the plan; create no study",
    )  # fmt: skip
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar and no line per trial"
    )
    loudness.add_argument("-v", "--verbose", action="store_true", help="Optuna's own log too")
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by --workers


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = make_parser().parse_args(argv)
    # The command as typed, for run.log (argv is not sys.argv when called in-process).
    args.command_line = shlex.join(["nas", "run", *(sys.argv[1:] if argv is None else argv)])
    return args


def run(args: argparse.Namespace) -> int:
    """The search, its output copied into results/<study>/run.log once the inputs pass."""
    import optuna

    from nas.search.console import run_log
    from nas.search.run import search

    if args.verbose:
        optuna.logging.set_verbosity(optuna.logging.INFO)
    with run_log(args.command_line) as log:
        catch_interrupts()
        if args.storage:  # one nas may not write into (another program's file) before the data
            from nas.search.storage import check_sqlite

            check_sqlite(args.storage)
        processes = processes_option(args.processes)
        check_pool_options(args)
        return search(args, log, processes, HOOKS)


def _score_validation_volumes(
    study: optuna.Study,
    study_dir: Path,
    front: list[FrozenTrial],
    data: TrainingData,
    device: torch.device,
) -> float:
    """The front's whole validation volumes scored; the seconds it took."""
    from nas.evaluation.heldout import score_validation_volumes

    return score_validation_volumes(study, study_dir, front, data, device)


def _score_test_cases(
    study: optuna.Study,
    study_dir: Path,
    front: list[FrozenTrial],
    split: TestSplit,
    device: torch.device,
) -> None:
    """The front scored on the held-out test cases, as its exports would segment them."""
    from nas.evaluation.heldout import score_trials

    score_trials(study, study_dir, front, split, device)


# What the search uses from above nas.search, each imported only when it runs.
HOOKS = RunHooks(device_option, _score_validation_volumes, _score_test_cases)


def main(argv: Sequence[str] | None = None) -> int:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return exit_code(run, parse_args(argv))
    finally:  # as they were, for a caller in the same process
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
