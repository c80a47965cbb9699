"""`python -m nas.run SPACE.yaml`: start or resume a search and keep results/<study>/ current.

A thin command line over space, data, study and results: parse options, load and check
everything a trial needs before the first one starts, run the trials with a progress bar and
one line per finished trial, and map user mistakes to one message and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from nas.core.locking import file_lock
from nas.core.staging import atomic_write, check_output_folder, remove_stale_staging

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.commands.console import RunLog, RunProgress
    from nas.data import Case, Dataset
    from nas.data.test_split import TestSplit
    from nas.search.patch_plan import PatchPlan
    from nas.search.schedule.policy import Schedule
    from nas.search.space import SearchSpace, StudySection

# The storage URL for workers started by --workers, and a way for users to keep a database
# password off the command line (where `ps` shows it to everyone on the machine).
STORAGE_ENV = "NAS_STORAGE"
SPACE_FILE = "space.yaml"  # the effective search space, beside the study
RUN_LOG = "run.log"  # what the run printed, and the warnings raised


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
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = make_parser().parse_args(argv)
    # The command as typed, for run.log (argv is not sys.argv when called in-process).
    args.command_line = shlex.join(["nas", "run", *(sys.argv[1:] if argv is None else argv)])
    return args


def _trial_line(trial: FrozenTrial) -> str:
    from nas.search.record import TrialRecord

    record = TrialRecord.of(trial)
    dims = record.spatial_dims or "?"
    params = f"{record.n_params:>10,}" if record.n_params is not None else " " * 10
    iou = f"{record.iou:.3f}" if record.iou is not None else "  -  "
    epochs = record.epochs_run
    steps = record.fidelity_steps
    line = (
        f"trial {trial.number:3d}  {dims}D  params {params}  IoU {iou}  "
        f"epochs {epochs if epochs is not None else '-':>3}  "
        f"steps {steps if steps is not None else '-':>5}  "
        f"{record.seconds or 0.0:6.1f}s  {trial.state.name}"
    )
    if record.quantity("latency_ms") is not None:
        line += f"  {record.quantity('latency_ms'):.2f} ms"
    if record.continues is not None:
        line += f"  (continues trial {record.continues})"
    if record.rejected is not None:
        line += f"  (rejected: {record.rejected})"
    elif record.fail_reason is not None:
        line += f"  ({record.fail_reason})"
    return line


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: abandon the trial, write results/, exit 130 or 143."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.exit_code = 128 + signum


def _interrupt(signum, frame) -> None:
    """The first Ctrl-C or SIGTERM interrupts; later ones are ignored, so that none lands in
    the middle of recording the abandoned trial (which would leave it RUNNING)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def _refresh(study: optuna.Study, study_dir: Path) -> list[FrozenTrial] | None:
    """Rewrite results/ from the study; one worker at a time, each file renamed into place.
    A failure (a full disk, say) is reported and the search goes on: the study is intact and
    the next refresh, or `nas.report`, writes the views again."""
    from nas.commands.report import publish_curves, write_report
    from nas.search.results import write_results

    try:
        with file_lock(study_dir / ".results.lock"):
            trials = study.get_trials(deepcopy=False)  # one read for every view
            front = write_results(study, study_dir, trials)
            write_report(study, study_dir, trials, front)
            publish_curves(study, front)
    except Exception as err:
        print(f"warning: could not rewrite {study_dir}/ ({type(err).__name__}: {err}); "
              "the study is intact", file=sys.stderr, flush=True)  # fmt: skip
        return None
    return front


def _abandon_own_trials(study: optuna.Study) -> None:
    """Record as interrupted any trial of this process that an interrupt left RUNNING (one
    that arrived in Optuna's own code, outside the objective)."""
    from optuna.trial import TrialState

    from nas.search.liveness import fail_and_retry, worker_id
    from nas.search.record import TrialRecord
    from nas.search.study import INTERRUPTED

    me = worker_id()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if TrialRecord.of(trial).worker == me:  # rerun by the next run, as any interrupted
            fail_and_retry(study, trial, INTERRUPTED, retries=0, by_number={})


def _worker_command(
    args: argparse.Namespace, index: int, threads: int, data_workers: int
) -> list[str]:
    command = [sys.executable, "-m", "nas.run", str(args.space), "--workers", "1",
               "--threads", str(threads), "--data-workers", str(data_workers),
               "--worker-index", str(index),
               "--results-dir", str(args.results_dir), "--device", args.device]  # fmt: skip
    for option in ("n_trials", "timeout", "budget", "study_name", "seed"):
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    for setting in args.settings:  # the workers search the same effective space
        command += ["--set", setting]
    if args.data is not None:
        command += ["--data", str(args.data)]
    if args.quiet:
        command.append("-q")
    return command  # the storage goes through the environment: no password in `ps`


def _run_workers(args: argparse.Namespace, study: optuna.Study, setup: _Setup, storage: str) -> int:
    """Start `--workers` processes on the study and wait for them; results/ at the end.

    Each worker has its own process group, so a Ctrl-C at the terminal reaches this process
    only, and each worker gets exactly one signal, passed on from here."""
    import torch

    from nas.training.batches import default_workers

    gpus = torch.cuda.device_count()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    data_workers = args.data_workers
    if data_workers is None:  # the machine's cores shared among the workers
        data_workers = default_workers(torch.device("cuda" if gpus else "cpu"), args.workers)
    workers = []
    for index in range(args.workers):
        env = dict(os.environ)
        env[STORAGE_ENV] = storage
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        command = _worker_command(args, index, threads, data_workers)
        workers.append(subprocess.Popen(command, env=env, start_new_session=True))
    where = f"GPU {', '.join(str(i % gpus) for i in range(args.workers))}" if gpus else "CPU"
    print(f"{args.workers} workers on {where}, {threads} torch thread(s) each", flush=True)
    interrupted = 0
    try:
        codes = [worker.wait() for worker in workers]
    except Interrupted as err:
        interrupted = err.exit_code
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(interrupted - 128)
        codes = [worker.wait() for worker in workers]
    if not interrupted:
        _score_front(study, setup)
    study_dir = setup.study_dir
    front = _refresh(study, study_dir) or []
    lost = [f"worker {i} exited with {code}" for i, code in enumerate(codes) if code]
    if interrupted:
        print("interrupted: finished trials are kept; run the same command to continue")
        return interrupted
    _summary(study, study_dir, front, args)
    if lost:
        print("; ".join(lost) + ": its trial is retried by a live worker or on the next run")
        return 1
    return 0


def _summary(
    study: optuna.Study, study_dir: Path, front: list[FrozenTrial], args: argparse.Namespace
) -> None:
    from optuna.trial import TrialState

    from nas.search.record import StudyRecord
    from nas.search.results import undertrained_numbers
    from nas.search.scoring import raised_first_cut
    from nas.search.storage import redact

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    print(f"{len(completed)} completed trials; Pareto front of {len(front)}:")
    marked = undertrained_numbers(front)
    for trial in front:
        far_less = "  (trained far less than a front member of similar size)"
        print("  " + _trial_line(trial) + (far_less if trial.number in marked else ""))
    for row in StudyRecord.of(study).rung_correlations:
        if row["spearman"] is not None:
            print(f"rung {row['lower']} foretold rung {row['upper']} with Spearman "
                  f"{row['spearman']:.2f} over {row['candidates']} candidates")  # fmt: skip
    raised = raised_first_cut(study.get_trials(deepcopy=False))
    if raised is not None:
        print(
            f"the first cut foretold the next rung weakly: new candidates from trial "
            f"{raised[0]} on trained to epoch {raised[1]} before their first ranking"
        )
    print(
        f"results in {study_dir}/ (report.html, trials.csv, pareto.csv, pareto.png, "
        "checkpoints/, artifacts/)"
    )
    custom = f" --storage {redact(args.storage)}" if args.storage else ""
    print(f"inspect with: python -m nas.dashboard {study_dir}{custom}")


def _dry_run(setup: _Setup) -> int:
    """Print what the search would do; no study, no results folder."""
    from nas.commands.dry_run import (
        describe_candidate,
        sample_candidate,
        validation_share,
        whole_volume_lines,
    )

    space, dataset, test_split = setup.space, setup.dataset, setup.test_split
    train_cases, val_cases = setup.train_cases, setup.val_cases
    data, study = space.data, space.study
    split = f"splits file {data.splits_file}" if data.splits_file else f"{data.n_folds} folds"
    held_out = f", {len(test_split.cases)} held-out" if test_split else ""
    print(f"data {dataset.root}: {len(dataset.cases)} cases, {len(train_cases)} training / "
          f"{len(val_cases)} validation (fold {data.fold} of {split}){held_out}; "
          f"classes {', '.join(dataset.scheme.scored_names)}; cache {dataset.cache}")  # fmt: skip
    print(setup.patch_plan.describe())
    print(f"study {study.name!r}: objectives {', '.join(study.objectives)}, sampler "
          f"{study.sampler}, up to {study.n_trials} trials")  # fmt: skip
    print(_plan_line(setup.schedule, space))
    candidate = sample_candidate(space, dataset.in_channels, dataset.scheme.out_channels)
    line, step = describe_candidate(candidate, dataset.in_channels, train_cases, dataset.scheme,
                                    data.slicing, setup.device)  # fmt: skip
    print(line)
    print(validation_share(candidate, val_cases, dataset.scheme, space, setup.schedule.rungs,
                           step, setup.device))  # fmt: skip
    n_test = len(test_split.cases) if test_split else 0
    for line in whole_volume_lines(candidate, space, dataset.in_channels, val_cases, n_test,
                                   setup.device):  # fmt: skip
        print(line)
    print("dry run: no study was created")
    return 0


def _check_latency_device(space: SearchSpace, args: argparse.Namespace) -> None:
    """study.latency.device must exist here, before the study is created."""
    import torch

    from nas.search.space_file import source_of

    name = space.study.latency.device
    if name is None:
        return
    device = torch.device(name)
    if device.type == "cuda":
        present = torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    elif device.type == "mps":
        present = torch.backends.mps.is_available()
    else:
        present = True
    if not present:
        where = source_of("study.latency", args.space, args.settings)
        raise NasError(where, f"study.latency.device: {name} is not on this machine")


def _check_init_weights(
    space: SearchSpace, warm_start: list[dict], in_channels: int, out_channels: int
) -> None:
    """train.init_weights, before the study opens: each file named must be a checkpoint, and
    fit the architecture of the space where it is fixed and of each enqueued candidate that
    fixes every field. A sampled candidate it does not fit fails as a trial."""
    import optuna

    from nas.network.state_dict import first_mismatch, read_weights
    from nas.search.draw import sample
    from nas.training.fit import init_model

    entry = space.train.get("init_weights")
    paths = [c for spec in entry for c in spec.choices] if isinstance(entry, tuple) else [entry]
    states = {path: read_weights(Path(path)) for path in paths if path is not None}
    if not states:
        return
    for params in [{}, *warm_start]:
        for path, state in states.items():
            try:
                fixed = optuna.trial.FixedTrial({**params, "init_weights": path})
                candidate = sample(space, fixed, in_channels, out_channels, 0)
            except ValueError:  # a field left to the sampler: checked when sampled
                continue
            problem = first_mismatch(init_model(candidate.unet, 0), state)
            if problem is not None:
                which = "an enqueued candidate" if params else "the space's architecture"
                raise NasError(path, f"does not fit {which} (train.init_weights): {problem}")


def _schedule(space: SearchSpace, args: argparse.Namespace, deadline: float | None) -> Schedule:
    """The run's schedule; a budget too small for one candidate's lowest rung is refused."""
    from nas.search.schedule.policy import Schedule, fewest_batches_per_epoch
    from nas.search.space_file import source_of

    try:
        schedule = Schedule.of(space, deadline)
    except ValueError as err:
        where = source_of("train.epochs", args.space, args.settings)
        raise NasError(where, f"train.epochs: {err}") from None
    lowest = schedule.rungs[0] * fewest_batches_per_epoch(space)
    if schedule.budget_steps is not None and schedule.budget_steps < lowest:
        raise NasError(
            "--budget"
            if args.budget is not None
            else source_of("study.budget", args.space, args.settings),
            f"a budget of {schedule.budget_steps} optimiser steps is less than one candidate's "
            f"lowest rung ({schedule.rungs[0]} epochs, {lowest} steps)",
        )
    return schedule


def _plan_line(schedule: Schedule, space: SearchSpace) -> str:
    rungs = ", ".join(str(r) for r in schedule.rungs)
    limits = []
    if schedule.budget_steps is not None:
        limits.append(f"{schedule.budget_steps:,} optimiser steps")
    if space.study.timeout is not None:
        limits.append(f"{space.study.timeout:g} s")
    within = " within " + " and ".join(limits) if limits else ""
    if len(schedule.rungs) == 1:
        return f"every candidate trains {rungs} epochs{within}"
    return (f"candidates train {schedule.rungs[0]} epochs, the top 1/{schedule.eta} of each "
            f"rung continue (rungs at epochs {rungs}){within}")  # fmt: skip


def _worker_salt(args: argparse.Namespace, storage: str) -> int:
    """0 for the usual single process (reproducible draws); the worker's index + 1 for
    --workers; for a shared server, storage proxy or journal, where other hosts may start at
    the same moment with the same seed, a number from this host and process."""
    if args.worker_index is not None:
        return args.worker_index + 1
    if storage.startswith("sqlite:"):
        return 0
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())


def run(args: argparse.Namespace) -> int:
    """The search, its output copied into results/<study>/run.log once the inputs pass."""
    import optuna

    from nas.commands.console import run_log

    if args.verbose:
        optuna.logging.set_verbosity(optuna.logging.INFO)
    with run_log(args.command_line) as log:
        return _search(args, log)


@dataclass(frozen=True)
class _Setup:
    """What a run searches, on which cases and device, as this command and its space say."""

    effective: dict  # the space as read, --set and --data included
    space: SearchSpace  # validated, with the study overrides and the patch plan applied
    schedule: Schedule
    dataset: Dataset
    train_cases: list[Case]
    val_cases: list[Case]
    test_split: TestSplit | None  # scored after the search, never used to select
    patch_plan: PatchPlan
    warm_start: list[dict]  # the parameters of the space's enqueued candidates
    device: torch.device
    start: float  # time.monotonic() when the run began
    results_dir: Path
    artifacts: str | None  # the artifact store this command names, checked (--artifacts)

    @property
    def study_dir(self) -> Path:
        return self.results_dir / self.space.study.name


def _search(args: argparse.Namespace, log: RunLog) -> int:
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    is_worker = args.worker_index is not None
    if args.storage:  # one nas may not write into (another program's file) before the data
        from nas.search.storage import check_sqlite

        check_sqlite(args.storage)
    setup = _set_up(args)
    check_output_folder(setup.study_dir)  # a dry run says so too
    if args.dry_run:
        return _dry_run(setup)
    study, storage = _open_run_study(args, log, setup)
    from nas.search.schedule.policy import has_work
    from nas.search.study import n_settled

    working = has_work(study.get_trials(deepcopy=False), setup.schedule)
    if not is_worker:
        _announce(setup, study, storage, n_settled(study))
    if working and args.workers > 1:
        return _run_workers(args, study, setup, storage)
    if working:
        interrupted = _run_trials(args, log, setup, study)
        if interrupted is not None:
            return interrupted
    if is_worker:
        return 0
    _score_front(study, setup)
    front = _refresh(study, setup.study_dir) or []
    _summary(study, setup.study_dir, front, args)
    return 0


def _set_up(args: argparse.Namespace) -> _Setup:
    """The space, schedule, cases and device of this run. What a user can get wrong in the
    space, the settings or the data is found before torch loads, so the one-line error comes
    at once."""
    from nas.data import load_dataset, split_dataset
    from nas.data.test_split import find_test_split
    from nas.search.space_file import read_effective_space, validate_space, with_study_overrides

    processes = processes_option(args.processes)
    check_pool_options(args)
    effective = read_effective_space(args.space, args.settings, args.data)
    space = validate_space(effective, args.space, args.settings)
    overrides = {
        "n_trials": args.n_trials,
        "timeout": args.timeout,
        "budget": args.budget,
        "name": args.study_name,
        "seed": args.seed,
    }
    space = with_study_overrides(space, overrides)
    start = time.monotonic()
    deadline = None if space.study.timeout is None else start + space.study.timeout
    schedule = _schedule(space, args, deadline)
    is_worker = args.worker_index is not None
    artifacts = None if is_worker else _artifact_store(args, space)  # before any write
    dataset = load_dataset(space.data, processes=processes)
    train_cases, val_cases = split_dataset(dataset, space.data)
    _check_validation_cases(args, space, val_cases)
    # Checked before the study is touched; scored after the search, never used to select.
    test_split = None if is_worker else find_test_split(space.data, dataset)

    import torch

    from nas.search.draw import warm_start_params
    from nas.search.patch_plan import plan_patches

    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_option(args.device)
    patch_plan = plan_patches(space, dataset, device)  # `auto` patch and batch sizes
    space = patch_plan.apply(space)
    warm_start = [warm_start_params(space, fields) for fields in space.study.enqueue]
    _check_init_weights(space, warm_start, dataset.in_channels, dataset.scheme.out_channels)
    _check_latency_device(space, args)
    return _Setup(effective, space, schedule, dataset, train_cases, val_cases, test_split,
                  patch_plan, warm_start, device, start, args.results_dir,
                  artifacts)  # fmt: skip


def _check_validation_cases(args: argparse.Namespace, space: SearchSpace, val_cases: list) -> None:
    """The fold holds the validation cases the space asks the search to validate on."""
    from nas.search.scoring import search_validation_cases
    from nas.search.space_file import source_of

    try:
        search_validation_cases(val_cases, space.study.validation.cases, space.study.seed)
    except ValueError as err:
        where = source_of("study.validation.cases", args.space, args.settings)
        raise NasError(where, f"study.validation.cases {err} (fold {space.data.fold})") from None


def _artifact_store(args: argparse.Namespace, space: SearchSpace) -> str | None:
    """The artifact store this command names (--artifacts, else study.artifacts) as the
    study records it, once nas has written to it and read back; None when it names none."""
    from nas.search.trial_files import check_writable, open_store, store_url

    given, where = args.artifacts, "--artifacts"
    if given is None:
        given, where = space.study.artifacts, "study.artifacts"
    if given is None:
        return None
    url = store_url(given, where)
    check_writable(open_store(url, where), url, where)
    return url


def _check_artifact_store(
    study: optuna.Study, study_dir: Path, storage: str, given: str | None
) -> None:
    """The study records the store it was given (once); a store other than the one it
    records is refused, and the one it records must still be there."""
    from nas.search.record import StudyRecord, write_study
    from nas.search.storage import local_file
    from nas.search.trial_files import open_store

    recorded = StudyRecord.of(study).artifacts
    name = study.study_name
    if given is not None and recorded is not None and given != recorded:
        raise NasError("--artifacts", f"study {name!r} keeps its trial files in {recorded}; "
                       "give that store, or none (the study's is used)")  # fmt: skip
    if recorded is None and given is not None:
        write_study(study, artifacts=given)
    elif recorded is not None and given is None:
        open_store(recorded, f"study {name!r}")  # still there?
    elif recorded is None and (local_file(storage) is None or storage.startswith("journal:")):
        print(f"note: the trial files stay in {study_dir} on this host, so other hosts "
              "cannot continue, export or retrain what it trains: give the study a store "
              "they all reach (--artifacts FOLDER or s3://BUCKET/PREFIX)", flush=True)  # fmt: skip


def _open_run_study(
    args: argparse.Namespace, log: RunLog, setup: _Setup
) -> tuple[optuna.Study, str]:
    """The run's study, created or resumed (a worker finds the one its parent opened); the
    first process also checks the study accepts this space and data, and settles the trials
    a crashed run left."""
    import yaml

    from nas.network.model_card import describe_data
    from nas.search import resume
    from nas.search.liveness import settle_orphans
    from nas.search.record import write_study
    from nas.search.results import checkpoint_path
    from nas.search.study import default_storage, open_study

    space, study_dir = setup.space, setup.study_dir
    is_worker = args.worker_index is not None
    storage = args.storage or default_storage(study_dir)
    # Workers started by --workers find the study their parent opened (and re-enqueued).
    # First: a storage that cannot be opened (no server, no proxy) leaves no folder behind.
    salt = _worker_salt(args, storage)
    study = open_study(space.study, storage, setup.warm_start, not is_worker, salt)
    study_dir.mkdir(parents=True, exist_ok=True)
    for folder in (study_dir, checkpoint_path(study_dir, 0).parent):
        remove_stale_staging(folder)  # what a killed process was writing
    if not is_worker:
        log.attach(study_dir / RUN_LOG)
    if is_worker:
        return study, storage
    _check_artifact_store(study, study_dir, storage, setup.artifacts)
    data = {
        "data_config": space.data.to_dict(),
        "data_description": describe_data(setup.dataset),
        "patch_plan": setup.patch_plan.to_dict(),
        "data_cases": {
            "train": [case.name for case in setup.train_cases],
            "validation": [case.name for case in setup.val_cases],
        },
    }
    resume.check(study, space, data, args.space, args.extend_space)
    write_study(study, validation=resume.validation_record(space))  # for resumes, intervals
    # What this run searches, --set and --data included; once the study accepted it.
    text = yaml.safe_dump(setup.effective, sort_keys=False)
    atomic_write(study_dir / SPACE_FILE, lambda tmp: tmp.write_text(text))
    orphans = settle_orphans(study, space.study.heartbeat)  # a crashed run's trials
    if orphans.failed:
        numbers = ", ".join(str(n) for n in orphans.failed)
        print(f"trial(s) {numbers} lost their worker: marked FAIL and run again", flush=True)
    return study, storage


def _announce(setup: _Setup, study: optuna.Study, storage: str, already: int) -> None:
    from nas.search.storage import redact

    study_cfg = setup.space.study
    remaining = study_cfg.n_trials - already
    print(
        f"study {study_cfg.name!r} in {redact(storage)}: {already} finished trials, "
        f"{max(remaining, 0)} to run on {setup.device} "
        f"({len(setup.train_cases)} training / {len(setup.val_cases)} validation cases, "
        f"preprocessed in {setup.dataset.cache})",
        flush=True,
    )
    print(setup.patch_plan.describe(), flush=True)
    print(_plan_line(setup.schedule, setup.space), flush=True)


def _run_trials(
    args: argparse.Namespace, log: RunLog, setup: _Setup, study: optuna.Study
) -> int | None:
    """Run trials in this process until the schedule has no more work, with a progress bar
    and a line per trial; the exit code when interrupted, else None."""
    from nas.commands.console import RunProgress
    from nas.search.candidate_state import TrainingData
    from nas.search.trial import make_objective
    from nas.search.trial_files import trial_files

    space, study_dir, study_cfg = setup.space, setup.study_dir, setup.space.study
    is_worker = args.worker_index is not None
    data = TrainingData(setup.train_cases, setup.val_cases, setup.dataset.scheme,
                        space.data.slicing, args.data_workers)  # fmt: skip
    objective = make_objective(space, data, setup.dataset.in_channels, setup.device, study_dir,
                               setup.schedule, trial_files(study, study_dir))  # fmt: skip
    prefix = f"[worker {args.worker_index}] " if is_worker else ""
    limits = (study_cfg.n_trials, study_cfg.timeout, setup.schedule.budget_steps, setup.start)
    bar = RunProgress(*limits, disable=is_worker or args.quiet, stream=log.console_err)
    progress = _TrialProgress(bar, study_dir, prefix, args.quiet)
    progress.show(study)
    with contextlib.closing(bar):
        try:
            _optimize(study, objective, study_cfg, setup.schedule, [progress.after_trial], prefix)
        except Interrupted as err:
            _abandon_own_trials(study)
            _refresh(study, study_dir)
            print(prefix + "interrupted: finished trials are kept; run the same command "
                  "to continue")  # fmt: skip
            return err.exit_code
    return None


@dataclass(frozen=True)
class _TrialProgress:
    """After each trial: the results folder refreshed, the trial's line, the bar moved."""

    bar: RunProgress
    study_dir: Path
    prefix: str
    quiet: bool

    def show(self, study: optuna.Study) -> None:
        from nas.search.schedule.fidelity import spending
        from nas.search.study import settled_count

        trials = study.get_trials(deepcopy=False)  # one read for both counts
        self.bar.update(settled_count(trials), spending(trials).steps)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _refresh(study, self.study_dir)
        if not self.quiet:
            self.bar.write(self.prefix + _trial_line(trial))
        self.show(study)


def _score_front(study: optuna.Study, setup: _Setup) -> None:
    """The front's members on the whole validation volumes (beside the patch score the
    search decided on), and on the held-out test cases, for the tables and the report; they
    are never used to select. Each says how long it took."""
    from nas.evaluation.heldout import score_trials, score_validation_volumes
    from nas.search.candidate_state import TrainingData
    from nas.search.record import write_study
    from nas.search.results import pareto_front
    from nas.search.scoring import rung_correlations

    front, split = pareto_front(study), setup.test_split
    write_study(study, rung_correlations=rung_correlations(study.get_trials(deepcopy=False)))
    data = TrainingData(setup.train_cases, setup.val_cases, setup.dataset.scheme,
                        setup.space.data.slicing)  # fmt: skip
    try:
        seconds = score_validation_volumes(study, setup.study_dir, front, data, setup.device)
        print(f"scored {len(front)} front member(s) on {len(setup.val_cases)} whole validation "
              f"volume(s) in {seconds:.1f} s", flush=True)  # fmt: skip
        if split is not None:
            start = time.perf_counter()
            score_trials(study, setup.study_dir, front, split, setup.device)
            print(f"scored {len(front)} front member(s) on {len(split.cases)} held-out test "
                  f"case(s) in {time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    except Exception as err:  # the search's results stand without them
        print(f"warning: could not score the front after the search "
              f"({type(err).__name__}: {err})", file=sys.stderr, flush=True)  # fmt: skip


def _optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], list[float]],
    study_cfg: StudySection,
    schedule: Schedule,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
    prefix: str,
) -> None:
    """Run trials until the schedule has no more work (new candidates, promotions), or the
    timeout. The run does not end while a trial that no live worker owns is RUNNING: such a
    trial is failed and rerun here, after its heartbeat goes stale if its worker was on
    another host."""
    from optuna.trial import TrialState

    from nas.search.liveness import describe_waiting, settle_orphans
    from nas.search.schedule.policy import StopAtTotal, enqueue_promotion, has_work
    from nas.training.fit import CandidateFailed

    deadline = schedule.deadline
    said_waiting = False
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            enqueue_promotion(study, schedule)
        if has_work(study.get_trials(deepcopy=False), schedule):
            study.optimize(
                objective,
                timeout=left,
                catch=(CandidateFailed,),
                callbacks=[*callbacks, StopAtTotal(schedule)],
            )
        settled = settle_orphans(study, study_cfg.heartbeat)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            continue  # reruns of failed orphans (or another worker's enqueued trials)
        if not settled.elsewhere or not has_work(study.get_trials(deepcopy=False), schedule):
            return
        if not said_waiting:
            print(prefix + describe_waiting(settled.elsewhere, study_cfg.heartbeat.grace_period),
                  flush=True)  # fmt: skip
            said_waiting = True
        time.sleep(min(5.0, study_cfg.heartbeat.heartbeat_interval))


def main(argv: Sequence[str] | None = None) -> int:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return exit_code(run, parse_args(argv))
    finally:  # as they were, for a caller in the same process
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
