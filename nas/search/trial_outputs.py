"""What a search trial leaves: its trained weights and the state a promotion continues from
(published for every host), the overlay and a front member's weights as Optuna artifacts, and
its note in optuna-dashboard, for however it ended."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna_dashboard import save_note

from nas.core.errors import NasError
from nas.network.describe import trial_note
from nas.search.artifacts import overlay_path, upload, write_overlay
from nas.search.candidate import Candidate
from nas.search.candidate_state import Outcome
from nas.search.objectives import violations
from nas.search.record import write
from nas.search.scoring import joins_front
from nas.search.trial_start import SearchRun
from nas.search.weights import save_checkpoint, save_state, state_path
from nas.training.fit import CandidateFailed, FitResult, is_out_of_memory


@dataclass(frozen=True)
class Measured:
    """What a trial's network is, as its notes show it."""

    number: int
    candidate: Candidate
    n_params: int
    macs: int
    patch: tuple[int, ...]
    start: float  # time.perf_counter() when the trial began


def save_weights(
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
        note(run, trial, measured, "FAIL", reason=reason, val_iou=result.scores.iou)
        raise CandidateFailed(reason) from err
    return weights


def save_artifacts(
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


def note(run: SearchRun, trial: optuna.Trial, measured: Measured, state: str, **outcome) -> None:
    """The trial's note in optuna-dashboard: its network and how it ended."""
    outcome |= {"state": state, "device": str(run.device)}
    outcome.setdefault("seconds", time.perf_counter() - measured.start)
    unet = measured.candidate.unet
    text = trial_note(trial.number, unet, measured.n_params, measured.macs, measured.patch, outcome)
    save_note(trial, text)
