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

Read top to bottom: `objective` wraps `run_trial`, which starts the trial
(nas/search/trial_start.py), measures and checks it, trains it segment by segment as its
`Progress` reports each epoch to the schedule (nas/search/trial_progress.py), records its
scores, and saves what it leaves (nas/search/trial_outputs.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from nas.core.resources import default_memory_limit_bytes
from nas.network.describe import summary
from nas.search.artifacts import example_case
from nas.search.candidate import Candidate
from nas.search.candidate_state import Outcome, TrainingData, train_candidate
from nas.search.liveness import TrialHeartbeat, needs_trial_heartbeat, worker_id
from nas.search.objectives import OBJECTIVES, Bound, rejection, values_of, violations
from nas.search.record import write
from nas.search.schedule.policy import Schedule
from nas.search.schedule.rungs import segment_ends
from nas.search.scoring import search_score, search_validation_cases
from nas.search.space import SearchSpace
from nas.search.study import INTERRUPTED
from nas.search.trial_files import TrialFiles
from nas.search.trial_outputs import Measured, note, save_artifacts, save_weights
from nas.search.trial_progress import Progress
from nas.search.trial_start import SearchRun, Started, start_trial, trial_costs
from nas.training.fit import CandidateFailed, is_out_of_memory, out_of_memory_reason
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


def run_trial(run: SearchRun, trial: optuna.Trial, start: float) -> list[float]:
    """Start (sample, or continue a parent), measure, check the constraints, train segment by
    segment as the schedule allows, record the scores, save the weights and the artifacts."""
    started = start_trial(run, trial)
    quantities, measured = _measure(run, trial, started, start)
    _reject_before_training(run, trial, measured, quantities)
    progress = Progress.after(run, trial, started, quantities)
    outcome = _train(run, started, progress)
    found, scores = _record_training(run, trial, measured, progress, outcome)
    if progress.pruned:
        note(run, trial, measured, "PRUNED", **scores, reason=progress.pruned[0])
        raise optuna.TrialPruned(progress.pruned[0])
    weights = save_weights(run, trial, measured, outcome, outcome.fit)
    quantities |= found
    constraints = run.space.study.constraints
    if constraints:  # on scores too: a trial that breaks one is infeasible
        _set_constraints(trial, quantities, constraints, before_training=False)
    values = values_of(quantities, run.space.study.objectives)
    save_artifacts(run, trial, measured, outcome, weights, quantities, values)
    note(run, trial, measured, "COMPLETE", **scores)
    return values


def _measure(
    run: SearchRun, trial: optuna.Trial, started: Started, start: float
) -> tuple[dict[str, float | None], Measured]:
    """The candidate's costs, recorded with its configs and summary; and what its notes show
    of it."""
    candidate = started.candidate
    patch = candidate.train.patch_size(candidate.unet.spatial_dims)
    quantities = trial_costs(run, started, patch)
    n_params, macs = int(quantities["params"]), int(quantities["macs"] or 0)
    write(trial, unet_config=candidate.unet.to_dict(),
          train_config=dataclasses.asdict(candidate.train))  # fmt: skip
    write(trial, **{name: value for name, value in quantities.items() if value is not None})
    write(trial, summary=summary(candidate.unet, n_params), rungs=started.rungs)
    return quantities, Measured(trial.number, candidate, n_params, macs, patch, start)


def _reject_before_training(
    run: SearchRun, trial: optuna.Trial, measured: Measured, quantities: dict[str, float | None]
) -> None:
    """The constraints known before training set on the trial; a candidate that breaks one is
    rejected (PRUNED) untrained."""
    constraints = run.space.study.constraints
    if not constraints:
        return
    _set_constraints(trial, quantities, constraints, before_training=True)
    broken = rejection(quantities, constraints)
    if broken:  # known before training: none is spent on it
        _set_constraints(trial, quantities, constraints, before_training=False)
        write(trial, rejected=broken)
        note(run, trial, measured, "PRUNED", reason=f"rejected before training: {broken}")
        raise optuna.TrialPruned(f"rejected before training: {broken}")


def _train(run: SearchRun, started: Started, progress: Progress) -> Outcome:
    """The candidate trained from where it starts, one segment per rung, until the schedule
    stops it, the run's time is up, or it reaches where it may end."""
    candidate = started.candidate
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
    return outcome


def _record_training(
    run: SearchRun, trial: optuna.Trial, measured: Measured, progress: Progress, outcome: Outcome
) -> tuple[dict[str, float], dict]:
    """The trial's scores at the epoch it reached, recorded first: whatever fails after
    training, they stay with the trial. Its scores (`trial_scores`), and those its note shows."""
    result, reached = outcome.fit, outcome.state.epoch
    progress.validated(reached, result.scores)
    score = search_score(progress.curve, reached)
    found = trial_scores(score, result.scores, run.metric)
    _record_scores(trial, found, result.scores, reached, measured.start)
    steps_per_epoch = measured.candidate.train.batches_per_epoch
    write(trial, stopped_by_time=result.stopped_by_time,
          fidelity_steps=reached * steps_per_epoch)  # fmt: skip
    scores = {"val_iou": found["iou"], "val_dice": found["dice"], "epochs_run": reached}
    if run.metric != "iou":
        scores["val_case_dice"] = found["case_dice"]
    return found, scores


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


def _fail(trial: optuna.Trial, reason: str, start: float) -> None:
    write(trial, fail_reason=reason, seconds=round(time.perf_counter() - start, 2))
