"""How a search trial starts: what every trial of the run shares (`SearchRun`), and the
trial's candidate, sampled new and checked against the memory limit, or enqueued to continue
a parent and loaded from its state; with its costs, measured or carried from its parent."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from nas.core.errors import NasError
from nas.data import Case
from nas.search.attr_schema import LATENCY_IQR_ATTR
from nas.search.candidate import Candidate
from nas.search.candidate_state import TrainingData, TrainingState
from nas.search.draw import sample
from nas.search.measure import measure_candidate
from nas.search.objectives import OBJECTIVES, curve_metric
from nas.search.record import QUANTITY_ATTRS, TrialRecord, write
from nas.search.schedule.continuation import lineage
from nas.search.schedule.policy import Schedule
from nas.search.schedule.pruner import validation_every
from nas.search.scoring import decision_epochs
from nas.search.space import SearchSpace
from nas.search.trial_files import TrialFiles
from nas.search.weights import checkpoint_path, load_state, state_path
from nas.training.fit import CandidateFailed, ValidationPlan
from nas.training.memory import check_fits
from nas.validation.validate import ValidationPatches


@dataclass(frozen=True)
class SearchRun:
    """What every trial of a run shares."""

    space: SearchSpace
    data: TrainingData
    in_channels: int
    device: torch.device
    study_dir: Path
    schedule: Schedule
    shown_case: Case  # the validation case each trial's overlay shows
    memory_limit: int  # bytes a candidate's training may need
    patches: ValidationPatches  # what every candidate's decisions are validated on
    files: TrialFiles  # where weights and states go so that every host of the study finds them

    def validation(self, start: int, end: int) -> ValidationPlan:
        """How a segment from epoch `start` to `end` validates: on the run's patches, after
        the epochs decisions read (every epoch with the pruner on, which compares curves)."""
        cfg = self.space.study.validation
        every = validation_every(cfg.every, self.schedule.pruner)
        return ValidationPlan(decision_epochs(start, end, every), self.patches)

    @property
    def metric(self) -> str:
        """What the learning curves hold and the search score smooths: iou or case_dice."""
        return curve_metric(self.space.study.objectives)

    @property
    def cost_names(self) -> list[str]:
        """What the pruner compares a candidate on besides its curve: the objectives to
        minimise."""
        return [name for name in self.space.study.objectives if not OBJECTIVES[name].maximise]

    def seed(self, trial: optuna.Trial) -> int:
        return self.space.study.seed + trial.number


@dataclass(frozen=True)
class Started:
    """A trial's candidate, where its training starts, and where it may end."""

    candidate: Candidate
    state: TrainingState | None  # None: fresh weights
    parent: FrozenTrial | None  # the trial it continues
    lineage: int  # the trial the candidate started in
    until: int  # the epoch its training may reach
    rungs: tuple[int, ...]  # where its segments end (a new one may start past a weak first cut)


def start_trial(run: SearchRun, trial: optuna.Trial) -> Started:
    """A new candidate sampled for `trial`, or the candidate it was enqueued to continue,
    loaded from its parent's state."""
    carried = TrialRecord.of_running(trial)  # what the trial was enqueued with
    top = run.schedule.rungs[-1]
    if carried.continues is None:
        rungs = run.schedule.new_candidate_rungs(trial.study.get_trials(deepcopy=False))
        return Started(new_candidate(run, trial), None, None, trial.number, top, rungs)
    candidate, state, parent = continued_candidate(run, trial, int(carried.continues))
    until = run.schedule.continuation_until(carried.until, state.epoch)
    return Started(candidate, state, parent, lineage(parent), until, run.schedule.rungs)


def new_candidate(run: SearchRun, trial: optuna.Trial) -> Candidate:
    out_channels = run.data.scheme.out_channels
    try:
        candidate = sample(run.space, trial, run.in_channels, out_channels, run.seed(trial))
    except ValidationError as err:
        message = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise CandidateFailed(f"invalid combination: {message}") from None
    too_large = check_fits(candidate.unet, candidate.train, run.in_channels, run.memory_limit)
    if too_large:
        raise CandidateFailed(too_large)
    write(trial, lineage=trial.number)
    return candidate


def continued_candidate(
    run: SearchRun, trial: optuna.Trial, number: int
) -> tuple[Candidate, TrainingState, FrozenTrial]:
    parent = _parent(trial, number)
    earlier = _claimed_before(trial, number)
    if earlier is not None:
        raise CandidateFailed(f"trial {earlier} already continues trial {number}")
    out_channels = run.data.scheme.out_channels
    with contextlib.suppress(ValidationError):  # the parameters, for the tables
        sample(run.space, trial, run.in_channels, out_channels, run.seed(trial))
    record = TrialRecord.of(parent)
    candidate = record.candidate()
    weights = checkpoint_path(run.study_dir, number)
    try:
        for path in (weights, state_path(weights)):  # trained on another host: fetched
            run.files.local(path)
        state = load_state(weights, run.device)
    except (OSError, RuntimeError, KeyError, NasError) as err:
        reason = f"cannot continue trial {number}: its state is lost ({err})"
        raise CandidateFailed(reason) from err
    for epoch, value in parent.intermediate_values.items():  # one curve across rungs
        trial.storage.set_trial_intermediate_value(trial._trial_id, epoch, value)
    return candidate, state, parent


def _parent(trial: optuna.Trial, number: int) -> FrozenTrial:
    for other in trial.study.get_trials(deepcopy=False):
        if other.number == number:
            return other
    raise CandidateFailed(f"cannot continue trial {number}: the study has no such trial")


def _claimed_before(trial: optuna.Trial, parent: int) -> int | None:
    """An earlier live trial continuing the same parent (two workers promoting at once)."""
    for other in trial.study.get_trials(deepcopy=False):
        same = TrialRecord.of(other).continues == parent and other.number < trial.number
        if same and other.state in (TrialState.RUNNING, TrialState.COMPLETE):
            return other.number
    return None


def trial_costs(
    run: SearchRun, started: Started, patch: tuple[int, ...]
) -> dict[str, float | None]:
    """A new network's costs, measured; a continued one's as measured when it started
    (latency varies), less its scores, which are this trial's to find."""
    if started.parent is None:
        return measure_candidate(
            started.candidate, patch, run.in_channels, run.device, run.space.study
        )
    record = TrialRecord.of(started.parent)
    quantities = {
        name: record.quantity(name) for name in QUANTITY_ATTRS if OBJECTIVES[name].before_training
    }
    quantities[LATENCY_IQR_ATTR] = record.latency_iqr_ms
    return quantities
