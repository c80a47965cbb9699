"""What a search run is set up with before its study opens: the space as this command and
its settings make it, the schedule, the cases, the patch plan and the device (`RunSetup`),
each checked so that what a user can get wrong is one line before any trial."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError

if TYPE_CHECKING:
    import torch

    from nas.data import Case, Dataset
    from nas.data.test_split import TestSplit
    from nas.search.patch_plan import PatchPlan
    from nas.search.run_hooks import RunHooks
    from nas.search.schedule.policy import Schedule
    from nas.search.space import SearchSpace


@dataclass(frozen=True)
class RunSetup:
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


def set_up(args: argparse.Namespace, processes: int | None, hooks: RunHooks) -> RunSetup:
    """The space, schedule, cases and device of this run. What a user can get wrong in the
    space, the settings or the data is found before torch loads, so the one-line error comes
    at once. `processes`: the checked `--processes`."""
    from nas.data import load_dataset, split_dataset
    from nas.data.test_split import find_test_split

    effective, space = _read_space(args)
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
    device = hooks.device(args.device)
    patch_plan = plan_patches(space, dataset, device)  # `auto` patch and batch sizes
    space = patch_plan.apply(space)
    warm_start = [warm_start_params(space, fields) for fields in space.study.enqueue]
    _check_init_weights(space, warm_start, dataset.in_channels, dataset.scheme.out_channels)
    _check_latency_device(space, args)
    return RunSetup(effective, space, schedule, dataset, train_cases, val_cases, test_split,
                    patch_plan, warm_start, device, start, args.results_dir,
                    artifacts)  # fmt: skip


def _read_space(args: argparse.Namespace) -> tuple[dict, SearchSpace]:
    """The space as read (--set and --data included), and validated with the study's
    command-line overrides."""
    from nas.search.space_file import read_effective_space, validate_space, with_study_overrides

    effective = read_effective_space(args.space, args.settings, args.data)
    space = validate_space(effective, args.space, args.settings)
    overrides = {
        "n_trials": args.n_trials,
        "timeout": args.timeout,
        "budget": args.budget,
        "name": args.study_name,
        "seed": args.seed,
    }
    return effective, with_study_overrides(space, overrides)


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


def plan_line(schedule: Schedule, space: SearchSpace) -> str:
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
