"""One search trial: what Optuna calls per trial (the study's objective function), turning a
sampled candidate into its values.

The values are the study's objectives (nas/objectives.py; [validation IoU, parameters] by
default), in the order `study.objectives` gives. Each trial stores its full builder and
training configs, its measurements (parameters, MACs, latency and memory when asked) and its
scores as user attrs (read back through nas/record.py), and its per-epoch validation IoU as
intermediate values, so optuna-dashboard can show everything from the storage alone. A
candidate that breaks a constraint known before training is rejected (PRUNED) untrained; one
that cannot be trained ends as a FAIL trial with its reason, and the study goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_note
from pydantic import ValidationError

from nas.artifacts import example_case, overlay_path, upload, write_overlay
from nas.builder import UNetConfig
from nas.candidate import TrainingData, TrainingState, load_state, save_state, train_candidate
from nas.describe import summary, trial_note
from nas.fidelity import lineage
from nas.liveness import JournalHeartbeat, is_journal, worker_id
from nas.measure import measure_candidate
from nas.memory import (
    check_fits,
    default_memory_limit_bytes,
)
from nas.objectives import (
    OBJECTIVES,
    Bound,
    non_dominated,
    rejection,
    values_of,
    violations,
)
from nas.record import LATENCY_IQR_ATTR, QUANTITY_ATTRS, TrialRecord, records, write
from nas.results import checkpoint_path, save_checkpoint
from nas.schedule import EpochReport, Schedule
from nas.space import Candidate, SearchSpace, sample
from nas.study import INTERRUPTED
from nas.train import (
    CandidateFailed,
    EpochResult,
    is_out_of_memory,
    out_of_memory_reason,
)
from nas.train_config import TrainConfig
from nas.validate import Scores


def _dominated(study: optuna.Study, values: Sequence[float], objectives: Sequence[str]) -> bool:
    """Whether a completed feasible trial is at least as good on every objective and better
    on one."""
    others = [r for r in records(study.get_trials(deepcopy=False)) if r.complete and r.feasible]
    if not others:
        return False
    points = np.array([[r.quantity(n) for n in objectives] for r in others] + [list(values)])
    return not bool(non_dominated(points, objectives)[-1])


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


def _record_scores(trial: optuna.Trial, scores: Scores, epochs: int, start: float) -> None:
    """The last validation scores, kept as user attrs (a pruned trial has no values)."""
    write(trial, iou=scores.iou, dice=scores.dice, val_iou_per_class=tuple(scores.iou_per_class),
          epochs_run=epochs, seconds=round(time.perf_counter() - start, 2))  # fmt: skip


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


def make_objective(
    space: SearchSpace,
    data: TrainingData,
    in_channels: int,
    device: torch.device,
    study_dir: Path,
    schedule: Schedule,
) -> Callable[[optuna.Trial], list[float]]:
    """The function Optuna calls per trial: a thin adapter between a trial and
    `train_candidate`. A new trial samples a candidate, checks its memory, counts it and
    trains it to the lowest rung; a trial enqueued with `continues` loads that trial's state
    and trains it on. At each rung the schedule decides whether it goes on; the trial ends
    with its scores at the fidelity it reached and, below the top rung, the state to be
    promoted from later.

    Whatever ends a trial early leaves its reason in `fail_reason`: a candidate that cannot
    be trained (too large, out of memory, diverged) raises CandidateFailed, which the caller
    catches so the study goes on; Ctrl-C or SIGTERM anywhere in the trial records
    INTERRUPTED, so the next run reruns it.
    """
    out_channels = data.scheme.out_channels
    shown_case = example_case(data.val_cases)
    gb = space.study.max_memory_gb
    memory_limit = int(gb * 1e9) if gb else default_memory_limit_bytes(device)
    top = schedule.rungs[-1]
    objectives = space.study.objectives
    # What the pruner compares a candidate on besides its curve: the objectives to minimise.
    cost_names = [name for name in objectives if not OBJECTIVES[name].maximise]

    def objective(trial: optuna.Trial) -> list[float]:
        start = time.perf_counter()
        try:
            write(trial, worker=worker_id())  # first: who owns this trial
            write(trial, device=str(device))
            journal = is_journal(trial.study)
            interval = space.study.heartbeat.heartbeat_interval
            with JournalHeartbeat(trial, interval) if journal else contextlib.nullcontext():
                return run_trial(trial, start)
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

    def new_candidate(trial: optuna.Trial) -> Candidate:
        try:
            candidate = sample(
                space, trial, in_channels, out_channels, space.study.seed + trial.number
            )
        except ValidationError as err:
            message = err.errors()[0]["msg"].removeprefix("Value error, ")
            raise CandidateFailed(f"invalid combination: {message}") from None
        too_large = check_fits(candidate.unet, candidate.train, in_channels, memory_limit)
        if too_large:
            raise CandidateFailed(too_large)
        write(trial, lineage=trial.number)
        return candidate

    def continued_candidate(
        trial: optuna.Trial, number: int
    ) -> tuple[Candidate, TrainingState, FrozenTrial]:
        parent = _parent(trial, number)
        earlier = _claimed_before(trial, number)
        if earlier is not None:
            raise CandidateFailed(f"trial {earlier} already continues trial {number}")
        with contextlib.suppress(ValidationError):  # the parameters, for the tables
            sample(space, trial, in_channels, out_channels, space.study.seed + trial.number)
        record = TrialRecord.of(parent)
        candidate = Candidate(
            UNetConfig.from_dict(record.unet_config), TrainConfig(**record.train_config)
        )
        try:
            state = load_state(checkpoint_path(study_dir, number), device)
        except (OSError, RuntimeError, KeyError) as err:
            reason = f"cannot continue trial {number}: its state is lost ({err})"
            raise CandidateFailed(reason) from err
        for epoch, value in parent.intermediate_values.items():  # one curve across rungs
            trial.storage.set_trial_intermediate_value(trial._trial_id, epoch, value)
        return candidate, state, parent

    def run_trial(trial: optuna.Trial, start: float) -> list[float]:
        carried = TrialRecord.of_running(trial)  # what the trial was enqueued with
        continues = carried.continues
        parent, until = None, top
        if continues is None:
            candidate, state, own = new_candidate(trial), None, trial.number
        else:
            candidate, state, parent = continued_candidate(trial, int(continues))
            own = lineage(parent)
            if carried.until is not None:  # trained beyond the top rung, as the schedule says
                until = carried.until
            elif state.epoch >= top:  # (a study from before `until` was recorded)
                until = state.epoch * schedule.eta
        patch = candidate.train.patch_size(candidate.unet.spatial_dims)
        if parent is None:
            quantities = measure_candidate(candidate, patch, in_channels, device, space.study)
        else:  # the same network: its costs as measured when it started (latency varies)
            record = TrialRecord.of(parent)
            quantities = {
                name: record.quantity(name)
                for name in QUANTITY_ATTRS
                if OBJECTIVES[name].before_training  # its scores are this trial's to find
            }
            quantities[LATENCY_IQR_ATTR] = record.latency_iqr_ms
        n_params, macs = int(quantities["params"]), int(quantities["macs"] or 0)
        write(trial, unet_config=candidate.unet.to_dict(),
              train_config=dataclasses.asdict(candidate.train))  # fmt: skip
        write(trial, **{name: value for name, value in quantities.items() if value is not None})
        write(trial, summary=summary(candidate.unet, n_params), rungs=tuple(schedule.rungs))
        steps_per_epoch = candidate.train.batches_per_epoch

        def note(state: str, **outcome) -> None:
            outcome |= {"state": state, "device": str(device)}
            outcome.setdefault("seconds", time.perf_counter() - start)
            text = trial_note(trial.number, candidate.unet, n_params, macs, patch, outcome)
            save_note(trial, text)

        constraints = space.study.constraints
        if constraints:
            _set_constraints(trial, quantities, constraints, before_training=True)
            broken = rejection(quantities, constraints)
            if broken:  # known before training: none is spent on it
                _set_constraints(trial, quantities, constraints, before_training=False)
                write(trial, rejected=broken)
                note("PRUNED", reason=f"rejected before training: {broken}")
                raise optuna.TrialPruned(f"rejected before training: {broken}")

        history = TrialRecord.of(parent) if parent is not None else None
        train_losses: list[float] = list(history.train_loss) if history else []
        epoch_seconds: list[float] = list(history.epoch_seconds) if history else []
        curve: dict[int, float] = dict(parent.intermediate_values) if parent else {}
        pruned: list[str] = []
        # Over the trial's segments: steps, and seconds of training and validation.
        spent = {"steps": 0, "seconds": 0.0, "before_segment": 0.0}
        promoted = [True]  # the last rung's answer: train on to the next

        def on_epoch(result: EpochResult) -> bool:
            """Record the epoch; answer whether training goes on."""
            train_losses.append(result.train_loss)
            epoch_seconds.append(round(result.train_seconds, 3))
            spent["steps"] += steps_per_epoch
            # Training and validation: what a step really costs the budget's clock.
            spent["seconds"] = spent["before_segment"] + result.seconds
            write(trial, train_loss=tuple(train_losses), epoch_seconds=tuple(epoch_seconds),
                  steps=spent["steps"], segment_seconds=round(spent["seconds"], 3))  # fmt: skip
            # Trial.report refuses multi-objective studies; the storage still keeps the curve,
            # which is what optuna-dashboard draws and the schedule and pruner compare.
            trial.storage.set_trial_intermediate_value(
                trial._trial_id, result.epoch, result.scores.iou
            )
            curve[result.epoch] = result.scores.iou
            write(trial, epochs_run=result.epoch)
            report = EpochReport(
                trial.number,
                own,
                result.epoch,
                curve,
                {name: quantities[name] for name in cost_names},
                steps_per_epoch,
                spent["seconds"] / spent["steps"],
            )
            verdict = schedule.after_epoch(trial.study.get_trials(deepcopy=False), report)
            if verdict.pruned:
                pruned.append(verdict.pruned)
            promoted[0] = verdict.go_on
            return verdict.go_on

        # One segment per rung, each with its own learning-rate decay: the weights a rung
        # ranks (and export may take) are annealed, whether or not the candidate goes on.
        for end in segment_ends(state.epoch if state else 0, until, schedule.rungs):
            outcome = train_candidate(candidate, data, device, end, state, on_epoch)
            state, result = outcome.state, outcome.fit
            spent["before_segment"] = spent["seconds"]
            if pruned or result.stopped_by_time or state.epoch < end or not promoted[0]:
                break
        reached = outcome.state.epoch
        # The scores first: whatever fails after training, they stay with the trial.
        _record_scores(trial, result.scores, reached, start)
        write(trial, stopped_by_time=result.stopped_by_time,
              fidelity_steps=reached * steps_per_epoch)  # fmt: skip
        if pruned:
            note("PRUNED", val_iou=result.scores.iou, val_dice=result.scores.dice,
                 epochs_run=reached, reason=pruned[0])  # fmt: skip
            raise optuna.TrialPruned(pruned[0])
        try:
            weights = save_checkpoint(study_dir, trial.number, outcome.state.weights)
            if not result.stopped_by_time:  # may be promoted, or trained longer, later
                save_state(weights, outcome.state)
        except OSError as err:  # a full disk, a lost mount: a front member needs its weights
            reason = f"trained, but its weights could not be saved ({err.strerror or err})"
            note("FAIL", reason=reason, val_iou=result.scores.iou)
            raise CandidateFailed(reason) from err
        quantities |= {"iou": result.scores.iou, "dice": result.scores.dice}
        if constraints:  # on scores too: a trial that breaks one is infeasible
            _set_constraints(trial, quantities, constraints, before_training=False)
        values = values_of(quantities, objectives)
        title = f"trial {trial.number}, IoU {result.scores.iou:.3f}"
        try:
            overlay = overlay_path(study_dir, trial.number)
            write_overlay(outcome.model, shown_case, data.scheme, patch, device,
                          data.slicing.axis, overlay, title)  # fmt: skip
            upload(trial, study_dir, overlay)
            feasible = not constraints or max(violations(quantities, constraints)) <= 0
            if feasible and not _dominated(trial.study, values, objectives):
                # On the front now: the only moment its weights can still join the trial (a
                # finished trial is read-only), and every final front member passes here.
                upload(trial, study_dir, weights)
        except Exception as err:  # the overlay and the uploads are for looking, not results
            if not (isinstance(err, OSError) or is_out_of_memory(err)):
                raise
            write(trial, artifact_error=f"{type(err).__name__}: {err}")
        note("COMPLETE", val_iou=result.scores.iou, val_dice=result.scores.dice,
             epochs_run=reached)  # fmt: skip
        return values

    return objective


def segment_ends(epoch: int, until: int, rungs: Sequence[int]) -> list[int]:
    """Where the segments of a training from `epoch` to `until` end: at each rung between
    them, and at `until`."""
    return [r for r in rungs if epoch < r < until] + [until]


def _fail(trial: optuna.Trial, reason: str, start: float) -> None:
    write(trial, fail_reason=reason, seconds=round(time.perf_counter() - start, 2))
