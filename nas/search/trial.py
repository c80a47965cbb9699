"""One search trial: what Optuna calls per trial (the study's objective function), turning a
sampled candidate into its values.

The values are the study's objectives (nas/search/objectives.py; [validation IoU, parameters] by
default), in the order `study.objectives` gives. Each trial stores its full builder and
training configs, its measurements (parameters, MACs, latency and memory when asked) and its
scores as user attrs (read back through nas/search/record.py), and its per-epoch validation IoU (or
case Dice, where that is the study's score: `objectives.curve_metric`) as intermediate
values, so optuna-dashboard can show everything from the storage alone. A
candidate that breaks a constraint known before training is rejected (PRUNED) untrained; one
that cannot be trained ends as a FAIL trial with its reason, and the study goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_note
from pydantic import ValidationError

from nas.core.errors import NasError
from nas.core.resources import default_memory_limit_bytes
from nas.data import Case
from nas.network.describe import summary, trial_note
from nas.search.artifacts import example_case, overlay_path, upload, write_overlay
from nas.search.candidate import Candidate
from nas.search.candidate_state import (
    Outcome,
    TrainingData,
    TrainingState,
    load_state,
    save_state,
    train_candidate,
)
from nas.search.draw import sample
from nas.search.liveness import TrialHeartbeat, needs_trial_heartbeat, worker_id
from nas.search.measure import measure_candidate
from nas.search.objectives import (
    OBJECTIVES,
    Bound,
    curve_metric,
    rejection,
    values_of,
    violations,
)
from nas.search.record import LATENCY_IQR_ATTR, QUANTITY_ATTRS, TrialRecord, write
from nas.search.results import checkpoint_path, save_checkpoint, state_path
from nas.search.schedule.fidelity import lineage
from nas.search.schedule.policy import EpochReport, Schedule
from nas.search.scoring import (
    decision_epochs,
    joins_front,
    kept_counts,
    search_score,
    search_validation_cases,
)
from nas.search.space import SearchSpace
from nas.search.study import INTERRUPTED
from nas.search.trial_files import TrialFiles
from nas.training.fit import (
    CandidateFailed,
    EpochResult,
    FitResult,
    ValidationPlan,
    is_out_of_memory,
    out_of_memory_reason,
)
from nas.training.memory import check_fits
from nas.validation.validate import Scores, ValidationPatches


def _set_constraints(
    trial: optuna.Trial,
    quantities: dict[str, float | None],
    constraints: dict[str, Bound],
    before_training: bool,
) -> None:
    """Optuna's constraint values (<= 0: holds), which its samplers (TPE, NSGA-II) read to
    learn the feasible region: those on quantities known before training, or the others
    (each may be set once); a quantity not known counts as holding."""
    for name, value in zip(sorted(constraints), violations(quantities, constraints), strict=True):
        if OBJECTIVES[name].before_training == before_training:
            trial.set_constraint(name, value)


def trial_scores(score: float, scores: Scores, metric: str) -> dict[str, float]:
    """A trial's iou, dice and case_dice: the search score (`scoring.search_score`) as its
    `metric` (what its curve holds: IoU, or case Dice), the last validation's for the others."""
    return {"iou": scores.iou, "dice": scores.dice, "case_dice": scores.case_dice, metric: score}


def _record_scores(
    trial: optuna.Trial, found: dict[str, float], scores: Scores, epochs: int, start: float
) -> None:
    """The trial's scores (`trial_scores`) and the last validation's per-class IoU, kept as
    user attrs (a pruned trial has no values)."""
    write(trial, **found, val_iou_per_class=tuple(scores.iou_per_class), epochs_run=epochs,
          seconds=round(time.perf_counter() - start, 2))  # fmt: skip


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
        every = cfg.every or (1 if self.schedule.pruner.type != "none" else None)
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


def make_objective(
    space: SearchSpace,
    data: TrainingData,
    in_channels: int,
    device: torch.device,
    study_dir: Path,
    schedule: Schedule,
    files: TrialFiles | None = None,
) -> Callable[[optuna.Trial], list[float]]:
    """The function Optuna calls per trial (`objective` over this run's `SearchRun`);
    `files`: the study's trial files (default: the results folder alone)."""
    gb = space.study.max_memory_gb
    memory_limit = int(gb * 1e9) if gb else default_memory_limit_bytes(device)
    shown_case = example_case(data.val_cases)
    cfg = space.study.validation
    cases = search_validation_cases(data.val_cases, cfg.cases, space.study.seed)
    patches = ValidationPatches(cases, cfg.patches_per_case, space.study.seed,
                                data.slicing.axis, cfg.foreground_fraction)  # fmt: skip
    run = SearchRun(space, data, in_channels, device, study_dir, schedule, shown_case,
                    memory_limit, patches, files or TrialFiles(study_dir))  # fmt: skip
    return functools.partial(objective, run)


def objective(run: SearchRun, trial: optuna.Trial) -> list[float]:
    """One trial, a thin adapter between a trial and `train_candidate`. A new trial samples a
    candidate, checks its memory, counts it and trains it to the lowest rung; a trial
    enqueued with `continues` loads that trial's state and trains it on. At each rung the
    schedule decides whether it goes on; the trial ends with its scores at the fidelity it
    reached and, below the top rung, the state to be promoted from later.

    Whatever ends a trial early leaves its reason in `fail_reason`: a candidate that cannot
    be trained (too large, out of memory, diverged) raises CandidateFailed, which the caller
    catches so the study goes on; Ctrl-C or SIGTERM anywhere in the trial records
    INTERRUPTED, so the next run reruns it.
    """
    start = time.perf_counter()
    try:
        write(trial, worker=worker_id())  # first: who owns this trial
        write(trial, device=str(run.device))
        own_heartbeat = needs_trial_heartbeat(trial.study)
        interval = run.space.study.heartbeat.heartbeat_interval
        with TrialHeartbeat(trial, interval) if own_heartbeat else contextlib.nullcontext():
            return run_trial(run, trial, start)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL
        write(trial, fail_reason=INTERRUPTED)
        raise
    except optuna.TrialPruned:
        raise
    except CandidateFailed as err:
        _fail(trial, err.reason, start)
        raise
    except Exception as err:
        if is_out_of_memory(err):
            reason = out_of_memory_reason(err)
            _fail(trial, reason, start)
            raise CandidateFailed(reason) from err
        _fail(trial, f"{type(err).__name__}: {err}", start)  # a bug: the run stops
        raise


@dataclass(frozen=True)
class Started:
    """A trial's candidate, where its training starts, and where it may end."""

    candidate: Candidate
    state: TrainingState | None  # None: fresh weights
    parent: FrozenTrial | None  # the trial it continues
    lineage: int  # the trial the candidate started in
    until: int  # the epoch its training may reach
    rungs: tuple[int, ...]  # where its segments end (a new one may start past a weak first cut)


@dataclass(frozen=True)
class Measured:
    """What a trial's network is, as its notes show it."""

    number: int
    candidate: Candidate
    n_params: int
    macs: int
    patch: tuple[int, ...]
    start: float  # time.perf_counter() when the trial began


def run_trial(run: SearchRun, trial: optuna.Trial, start: float) -> list[float]:
    """Start (sample, or continue a parent), measure, check the constraints, train segment by
    segment as the schedule allows, record the scores, save the weights and the artifacts."""
    started = start_trial(run, trial)
    candidate = started.candidate
    patch = candidate.train.patch_size(candidate.unet.spatial_dims)
    quantities = trial_costs(run, started, patch)
    n_params, macs = int(quantities["params"]), int(quantities["macs"] or 0)
    write(trial, unet_config=candidate.unet.to_dict(),
          train_config=dataclasses.asdict(candidate.train))  # fmt: skip
    write(trial, **{name: value for name, value in quantities.items() if value is not None})
    write(trial, summary=summary(candidate.unet, n_params), rungs=started.rungs)
    measured = Measured(trial.number, candidate, n_params, macs, patch, start)
    constraints = run.space.study.constraints
    if constraints:
        _set_constraints(trial, quantities, constraints, before_training=True)
        broken = rejection(quantities, constraints)
        if broken:  # known before training: none is spent on it
            _set_constraints(trial, quantities, constraints, before_training=False)
            write(trial, rejected=broken)
            _note(run, trial, measured, "PRUNED", reason=f"rejected before training: {broken}")
            raise optuna.TrialPruned(f"rejected before training: {broken}")

    progress = Progress.after(run, trial, started, quantities)
    state, outcome = started.state, None
    # One segment per rung, each with its own learning-rate decay: the weights a rung ranks
    # (and export may take) are annealed, whether or not the candidate goes on.
    for end in segment_ends(state.epoch if state else 0, started.until, started.rungs):
        segment = within_timeout(candidate, run.schedule, first=outcome is None)
        if segment is None:  # the run's time is up: the candidate stays at its rung
            break
        validation = run.validation(state.epoch if state else 0, end)
        outcome = train_candidate(segment, run.data, run.device, end, state, progress.on_epoch,
                                  validation)  # fmt: skip
        state, result = outcome.state, outcome.fit
        progress.end_segment()
        if progress.pruned or result.stopped_by_time or state.epoch < end or not progress.go_on:
            break
    reached = outcome.state.epoch
    progress.validated(reached, result.scores)
    score = search_score(progress.curve, reached)
    found = trial_scores(score, result.scores, run.metric)
    # The scores first: whatever fails after training, they stay with the trial.
    _record_scores(trial, found, result.scores, reached, start)
    steps_per_epoch = candidate.train.batches_per_epoch
    write(trial, stopped_by_time=result.stopped_by_time,
          fidelity_steps=reached * steps_per_epoch)  # fmt: skip
    scores = {"val_iou": found["iou"], "val_dice": found["dice"], "epochs_run": reached}
    if run.metric != "iou":
        scores["val_case_dice"] = found["case_dice"]
    if progress.pruned:
        _note(run, trial, measured, "PRUNED", **scores, reason=progress.pruned[0])
        raise optuna.TrialPruned(progress.pruned[0])
    weights = _save_weights(run, trial, measured, outcome, result)
    quantities |= found
    if constraints:  # on scores too: a trial that breaks one is infeasible
        _set_constraints(trial, quantities, constraints, before_training=False)
    values = values_of(quantities, run.space.study.objectives)
    _save_artifacts(run, trial, measured, outcome, weights, quantities, values)
    _note(run, trial, measured, "COMPLETE", **scores)
    return values


def start_trial(run: SearchRun, trial: optuna.Trial) -> Started:
    """A new candidate sampled for `trial`, or the candidate it was enqueued to continue,
    loaded from its parent's state."""
    carried = TrialRecord.of_running(trial)  # what the trial was enqueued with
    top = run.schedule.rungs[-1]
    if carried.continues is None:
        rungs = run.schedule.new_candidate_rungs(trial.study.get_trials(deepcopy=False))
        return Started(new_candidate(run, trial), None, None, trial.number, top, rungs)
    candidate, state, parent = continued_candidate(run, trial, int(carried.continues))
    until = top
    if carried.until is not None:  # trained beyond the top rung, as the schedule says
        until = carried.until
    elif state.epoch >= top:  # (a study from before `until` was recorded)
        until = state.epoch * run.schedule.eta
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


@dataclass
class Progress:
    """A trial's training as it goes: recorded after each epoch, which the schedule then
    judges (`on_epoch`, handed to `train_candidate`)."""

    trial: optuna.Trial
    schedule: Schedule
    lineage: int
    costs: dict[str, float | None]  # the pruner's, by objective name
    steps_per_epoch: int
    rungs: tuple[int, ...]  # where its segments end
    train_losses: list[float]
    epoch_seconds: list[float]
    curve: dict[int, float]
    # Per-case counts of this trial's validations, by epoch (`scoring.kept_counts` keeps them).
    case_counts: dict[int, tuple] = dataclasses.field(default_factory=dict)
    pruned: list[str] = dataclasses.field(default_factory=list)
    steps: int = 0  # over the trial's segments
    seconds: float = 0.0  # of training and validation, over the trial's segments
    before_segment: float = 0.0  # `seconds` when the current segment began
    go_on: bool = True  # the last rung's answer: train on to the next
    metric: str = "iou"  # what the curve holds (`objectives.curve_metric`)

    @classmethod
    def after(
        cls, run: SearchRun, trial: optuna.Trial, started: Started, quantities: dict
    ) -> Progress:
        """The progress a trial starts from: its parent's history, or none."""
        parent = started.parent
        history = TrialRecord.of(parent) if parent is not None else None
        return cls(
            trial,
            run.schedule,
            started.lineage,
            {name: quantities[name] for name in run.cost_names},
            started.candidate.train.batches_per_epoch,
            started.rungs,
            list(history.train_loss) if history else [],
            list(history.epoch_seconds) if history else [],
            dict(parent.intermediate_values) if parent else {},
            metric=run.metric,
        )

    def on_epoch(self, result: EpochResult) -> bool:
        """Record the epoch; answer whether training goes on."""
        trial = self.trial
        self.train_losses.append(result.train_loss)
        self.epoch_seconds.append(round(result.train_seconds, 3))
        self.steps += self.steps_per_epoch
        # Training and validation: what a step really costs the budget's clock.
        self.seconds = self.before_segment + result.seconds
        write(trial, train_loss=tuple(self.train_losses), epoch_seconds=tuple(self.epoch_seconds),
              steps=self.steps, segment_seconds=round(self.seconds, 3))  # fmt: skip
        if result.scores is None:  # not validated: nothing to judge
            write(trial, epochs_run=result.epoch)
            return True
        self.validated(result.epoch, result.scores)
        write(trial, epochs_run=result.epoch)
        report = EpochReport(
            trial.number,
            self.lineage,
            result.epoch,
            self.curve,
            self.costs,
            self.steps_per_epoch,
            self.seconds / self.steps,
            self.rungs,
        )
        verdict = self.schedule.after_epoch(trial.study.get_trials(deepcopy=False), report)
        if verdict.pruned:
            self.pruned.append(verdict.pruned)
        self.go_on = verdict.go_on
        return verdict.go_on

    def end_segment(self) -> None:
        self.before_segment = self.seconds

    def validated(self, epoch: int, scores: Scores) -> None:
        """Record a validation: on the curve, and its per-case counts. Called after each
        validated epoch, and once more after training for the last epoch, which `fit`
        validates after the fact where its time ran out just after an epoch it did not."""
        if epoch in self.curve and epoch in self.case_counts:
            return
        trial = self.trial
        self.case_counts[epoch] = scores.case_counts
        write(trial, val_case_counts=kept_counts(self.case_counts, epoch))
        # Trial.report refuses multi-objective studies; the storage still keeps the curve,
        # which is what optuna-dashboard draws and the schedule and pruner compare.
        value = scores.value(self.metric)
        trial.storage.set_trial_intermediate_value(trial._trial_id, epoch, value)
        self.curve[epoch] = value


def _save_weights(
    run: SearchRun, trial: optuna.Trial, measured: Measured, outcome: Outcome, result: FitResult
) -> Path:
    """The trained weights, and the state a later promotion continues from."""
    try:
        weights = save_checkpoint(run.study_dir, trial.number, outcome.state.weights)
        run.files.publish(weights)
        if not result.stopped_by_time:  # may be promoted, or trained longer, later
            save_state(weights, outcome.state)
            run.files.publish(state_path(weights))
    except (OSError, NasError) as err:  # a full disk, a lost mount or store: a front
        # member needs its weights
        why = err.strerror if isinstance(err, OSError) and err.strerror else err
        reason = f"trained, but its weights could not be saved ({why})"
        _note(run, trial, measured, "FAIL", reason=reason, val_iou=result.scores.iou)
        raise CandidateFailed(reason) from err
    return weights


def _save_artifacts(
    run: SearchRun,
    trial: optuna.Trial,
    measured: Measured,
    outcome: Outcome,
    weights: Path,
    quantities: dict[str, float | None],
    values: list[float],
) -> None:
    """The overlay, and the weights of a trial on the front now, as Optuna artifacts."""
    constraints = run.space.study.constraints
    title = f"trial {trial.number}, IoU {quantities['iou']:.3f}"
    try:
        overlay = overlay_path(run.study_dir, trial.number)
        write_overlay(outcome.model, run.shown_case, run.data.scheme, measured.patch, run.device,
                      run.data.slicing.axis, overlay, title)  # fmt: skip
        run.files.publish(overlay)  # for the report on any host
        upload(trial, run.files.dashboard_store(), overlay)
        feasible = not constraints or max(violations(quantities, constraints)) <= 0
        objectives = run.space.study.objectives
        trials = trial.study.get_trials(deepcopy=False)
        if feasible and joins_front(trials, trial.number, values, objectives):
            # On the front now: the only moment its weights can still join the trial (a
            # finished trial is read-only), and every final front member passes here.
            upload(trial, run.files.dashboard_store(), weights)
    except Exception as err:  # the overlay and the uploads are for looking, not results
        if not (isinstance(err, OSError | NasError) or is_out_of_memory(err)):
            raise
        write(trial, artifact_error=f"{type(err).__name__}: {err}")


def _note(run: SearchRun, trial: optuna.Trial, measured: Measured, state: str, **outcome) -> None:
    """The trial's note in optuna-dashboard: its network and how it ended."""
    outcome |= {"state": state, "device": str(run.device)}
    outcome.setdefault("seconds", time.perf_counter() - measured.start)
    unet = measured.candidate.unet
    text = trial_note(trial.number, unet, measured.n_params, measured.macs, measured.patch, outcome)
    save_note(trial, text)


def within_timeout(candidate: Candidate, schedule: Schedule, first: bool) -> Candidate | None:
    """`candidate` for its next segment of training, with the segment's time capped at what
    is left of the run's timeout: a run ends when it said it would even when training slows
    down, the segment's learning rate decaying by time and the segment stopping by time.
    None when the time is up before a later segment starts; a first segment that starts
    after it (a trial begun as the time ran out) is not capped."""
    left = schedule.time_left()
    if left is None or (left <= 0 and first):
        return candidate
    if left <= 0:
        return None
    cap = left if candidate.train.max_seconds is None else min(left, candidate.train.max_seconds)
    train = dataclasses.replace(candidate.train, max_seconds=cap)
    return dataclasses.replace(candidate, train=train)


def segment_ends(epoch: int, until: int, rungs: Sequence[int]) -> list[int]:
    """Where the segments of a training from `epoch` to `until` end: at each rung between
    them, and at `until`."""
    return [r for r in rungs if epoch < r < until] + [until]


def _fail(trial: optuna.Trial, reason: str, start: float) -> None:
    write(trial, fail_reason=reason, seconds=round(time.perf_counter() - start, 2))
