"""The Optuna study: open or resume it, and the objective that turns a trial into (IoU, params).

Directions are [maximize validation IoU, minimize parameter count]. Each trial stores its full
builder and training configs, its parameter count and its scores as user attrs, and its
per-epoch validation IoU as intermediate values, so optuna-dashboard can show everything
from the storage alone. A candidate that cannot be trained ends as a FAIL trial with its
reason, and the study goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_note
from pydantic import ValidationError

from nas.artifacts import example_case, overlay_path, upload, write_overlay
from nas.builder import count_parameters
from nas.data import Case
from nas.describe import count_macs, summary, trial_note
from nas.errors import NasError
from nas.evaluate import Scores
from nas.liveness import JournalHeartbeat, is_journal, worker_id
from nas.memory import check_fits, default_memory_limit_bytes
from nas.pruning import best_up_to, dominated_at_epoch
from nas.results import save_checkpoint
from nas.space import SearchSpace, StudySection, sample
from nas.storage import load_study, open_storage
from nas.train import (
    CandidateFailed,
    EpochResult,
    fit,
    init_model,
    is_out_of_memory,
    out_of_memory_reason,
)

DIRECTIONS = ("maximize", "minimize")  # validation IoU, parameter count
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{study_dir / 'study.db'}"


def make_sampler(
    cfg: StudySection, n_existing_trials: int, worker_salt: int = 0
) -> optuna.samplers.BaseSampler:
    # Offset the seed by the trials already run, so a resumed study does not replay the
    # random draws of its first run, and by the worker, so that workers started together
    # do not draw the same candidates.
    seed = (cfg.seed + n_existing_trials + 1_000_003 * worker_salt) % 2**32
    if cfg.sampler == "nsga2":
        kwargs = {"population_size": cfg.population_size} if cfg.population_size else {}
        return optuna.samplers.NSGAIISampler(seed=seed, **kwargs)
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(
    cfg: StudySection,
    storage: str,
    warm_start: Sequence[dict] = (),
    requeue_interrupted: bool = True,
    worker_salt: int = 0,
) -> optuna.Study:
    """Create the study, or load it with the same name from `storage` to continue it.

    warm_start: Optuna parameters of architectures a new study runs first. Trials a Ctrl-C
    or SIGTERM abandoned in an earlier run are enqueued again (once).
    worker_salt: different for each worker that may start at the same time as another.
    """
    storage_obj = open_storage(storage, cfg.heartbeat)
    try:
        try:
            study_id = storage_obj.get_study_id_from_name(cfg.name)
        except KeyError:  # a new study
            study_id = None
        n_existing = 0
        if study_id is not None:
            directions = [d.name.lower() for d in storage_obj.get_study_directions(study_id)]
            if directions != list(DIRECTIONS):
                raise NasError(storage, f"study {cfg.name!r} exists with directions {directions}")
            n_existing = storage_obj.get_n_trials(study_id)
        study = optuna.create_study(
            storage=storage_obj,
            study_name=cfg.name,
            directions=list(DIRECTIONS),
            sampler=make_sampler(cfg, n_existing, worker_salt),
            load_if_exists=True,
        )
    except NasError:
        raise
    except Exception as err:  # SQLAlchemy and Optuna raise many types for a bad URL
        raise NasError(storage, f"cannot open the study storage ({err})") from None
    if study_id is None:
        for params in warm_start:
            study.enqueue_trial(params, user_attrs={"warm_start": True})
    elif requeue_interrupted:
        _retry_interrupted(study)
    return study


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of FAIL trials that another trial reruns (a lost worker's, or interrupted)."""
    retried = set()
    for trial in trials:
        source = trial.system_attrs.get("failed_trial", trial.user_attrs.get("retry_of"))
        if source is not None:
            retried.add(int(source))
    return retried


def _retry_interrupted(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for trial in trials:
        interrupted = trial.user_attrs.get("fail_reason") == INTERRUPTED
        if trial.state == TrialState.FAIL and interrupted and trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def load_results_study(results: Path, storage: str | None = None) -> optuna.Study:
    """The study behind a results folder of nas.run (named after the folder)."""
    if storage is None:
        if not (results / "study.db").exists():
            raise NasError(results, "holds no study.db: not a results folder of nas.run")
        storage = default_storage(results)
    return load_study(storage, results.name)


def n_settled(study: optuna.Study) -> int:
    """Finished trials, a failed trial that is rerun counting once (through its rerun)."""
    return _n_settled(study.get_trials(deepcopy=False))


def _n_settled(trials: Sequence[FrozenTrial]) -> int:
    finished = [t for t in trials if t.state in FINISHED_STATES]
    retried = retried_numbers(trials)
    return sum(1 for t in finished if not (t.state == TrialState.FAIL and t.number in retried))


def has_work(trials: Sequence[FrozenTrial], n_trials: int) -> bool:
    """Whether a trial is waiting to be (re)run, or the study (all workers) has fewer than
    `n_trials` settled trials, counting those running now."""
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return _n_settled(trials) + running < n_trials


class StopAtTotal:
    """Optuna callback: stop this worker once the study has no more work (`has_work`)."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not has_work(study.get_trials(deepcopy=False), self.n_trials):  # one storage read
            study.stop()


def _dominated(study: optuna.Study, iou: float, n_params: int) -> bool:
    """Whether a completed trial is at least as good on both objectives and better on one."""
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        better_iou, fewer = other.values[0] >= iou, other.values[1] <= n_params
        if better_iou and fewer and (other.values[0] > iou or other.values[1] < n_params):
            return True
    return False


def _record_scores(trial: optuna.Trial, scores: Scores, epochs: int, start: float) -> None:
    """The last validation scores, kept as user attrs (a pruned trial has no values)."""
    trial.set_user_attr("val_iou", scores.iou)
    trial.set_user_attr("val_dice", scores.dice)
    trial.set_user_attr("val_iou_per_class", list(scores.iou_per_class))
    trial.set_user_attr("epochs_run", epochs)
    trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))


def make_objective(
    space: SearchSpace,
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    in_channels: int,
    n_classes: int,
    device: torch.device,
    study_dir: Path,
) -> Callable[[optuna.Trial], tuple[float, int]]:
    """The function Optuna calls per trial: sample, check memory, build, count, train, save.

    Whatever ends a trial early leaves its reason in `fail_reason`: a candidate that cannot
    be trained (too large, out of memory, diverged) raises CandidateFailed, which the caller
    catches so the study goes on; Ctrl-C or SIGTERM anywhere in the trial records
    INTERRUPTED, so the next run reruns it.
    """
    out_channels = 1 if n_classes == 1 else n_classes + 1
    slicing = space.data.slicing
    shown_case = example_case(val_cases)
    gb = space.study.max_memory_gb
    memory_limit = int(gb * 1e9) if gb else default_memory_limit_bytes(device)

    def objective(trial: optuna.Trial) -> tuple[float, int]:
        start = time.perf_counter()
        try:
            trial.set_user_attr("worker", worker_id())  # first: who owns this trial
            trial.set_user_attr("device", str(device))
            journal = is_journal(trial.study)
            interval = space.study.heartbeat.heartbeat_interval
            with JournalHeartbeat(trial, interval) if journal else contextlib.nullcontext():
                return run_trial(trial, start)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna marks the trial FAIL
            trial.set_user_attr("fail_reason", INTERRUPTED)
            raise
        except (optuna.TrialPruned, CandidateFailed):
            raise
        except Exception as err:
            if is_out_of_memory(err):
                reason = out_of_memory_reason(err)
                _fail(trial, reason, start)
                raise CandidateFailed(reason) from err
            _fail(trial, f"{type(err).__name__}: {err}", start)  # a bug: the run stops
            raise

    def run_trial(trial: optuna.Trial, start: float) -> tuple[float, int]:
        try:
            candidate = sample(
                space, trial, in_channels, out_channels, space.study.seed + trial.number
            )
        except ValidationError as err:
            reason = f"invalid combination: {err.errors()[0]['msg'].removeprefix('Value error, ')}"
            _fail(trial, reason, start)
            raise CandidateFailed(reason) from None
        too_large = check_fits(candidate.unet, candidate.train, in_channels, memory_limit)
        if too_large:
            _fail(trial, too_large, start)
            raise CandidateFailed(too_large)
        model = init_model(candidate.unet, candidate.train.seed)
        n_params = count_parameters(model)
        two_d = candidate.unet.spatial_dims == 2
        patch = candidate.train.patch_size_2d if two_d else candidate.train.patch_size_3d
        macs = count_macs(model, in_channels, patch)
        trial.set_user_attr("unet_config", candidate.unet.to_dict())
        trial.set_user_attr("train_config", dataclasses.asdict(candidate.train))
        trial.set_user_attr("n_params", n_params)
        trial.set_user_attr("macs", macs)
        trial.set_user_attr("summary", summary(candidate.unet, n_params))

        def note(state: str, **outcome) -> None:
            outcome |= {"state": state, "device": str(device)}
            outcome.setdefault("seconds", time.perf_counter() - start)
            text = trial_note(trial.number, candidate.unet, n_params, macs, patch, outcome)
            save_note(trial, text)

        train_losses: list[float] = []
        epoch_seconds: list[float] = []
        curve: dict[int, float] = {}

        def on_epoch(result: EpochResult) -> None:
            train_losses.append(result.train_loss)
            epoch_seconds.append(round(result.train_seconds, 3))
            trial.set_user_attr("train_loss", train_losses)
            trial.set_user_attr("epoch_seconds", epoch_seconds)
            # Trial.report refuses multi-objective studies; the storage still keeps the curve,
            # which is what optuna-dashboard draws and the pruner compares.
            trial.storage.set_trial_intermediate_value(
                trial._trial_id, result.epoch, result.scores.iou
            )
            curve[result.epoch] = result.scores.iou
            peers = trial.study.get_trials(deepcopy=False)
            best = best_up_to(curve, result.epoch)
            if dominated_at_epoch(
                space.study.pruner, peers, trial.number, n_params, result.epoch, best
            ):
                _record_scores(trial, result.scores, result.epoch, start)
                reason = f"stopped at epoch {result.epoch}: dominated by smaller networks"
                note("PRUNED", val_iou=result.scores.iou, val_dice=result.scores.dice,
                     epochs_run=result.epoch, reason=reason)  # fmt: skip
                raise optuna.TrialPruned(f"dominated at epoch {result.epoch}")

        try:
            result = fit(
                model,
                train_cases,
                val_cases,
                n_classes,
                candidate.train,
                device,
                on_epoch,
                slicing,
            )
        except CandidateFailed as err:
            _fail(trial, err.reason, start)
            note("FAIL", reason=err.reason)
            raise
        # The scores first: whatever fails after training, they stay with the trial.
        _record_scores(trial, result.scores, len(result.history), start)
        trial.set_user_attr("stopped_by_time", result.stopped_by_time)
        try:
            weights = save_checkpoint(study_dir, trial.number, model.state_dict())
        except OSError as err:  # a full disk, a lost mount: a front member needs its weights
            reason = f"trained, but its weights could not be saved ({err.strerror or err})"
            _fail(trial, reason, start)
            note("FAIL", reason=reason, val_iou=result.scores.iou)
            raise CandidateFailed(reason) from err
        title = f"trial {trial.number}, IoU {result.scores.iou:.3f}"
        try:
            overlay = overlay_path(study_dir, trial.number)
            write_overlay(model, shown_case, patch, device, slicing.axis, overlay, title)
            upload(trial, study_dir, overlay)
            if not _dominated(trial.study, result.scores.iou, n_params):
                # On the front now: the only moment its weights can still join the trial (a
                # finished trial is read-only), and every final front member passes here.
                upload(trial, study_dir, weights)
        except Exception as err:  # the overlay and the uploads are for looking, not results
            if not (isinstance(err, OSError) or is_out_of_memory(err)):
                raise
            trial.set_user_attr("artifact_error", f"{type(err).__name__}: {err}")
        note("COMPLETE", val_iou=result.scores.iou, val_dice=result.scores.dice,
             epochs_run=len(result.history))  # fmt: skip
        return result.scores.iou, n_params

    return objective


def _fail(trial: optuna.Trial, reason: str, start: float) -> None:
    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
