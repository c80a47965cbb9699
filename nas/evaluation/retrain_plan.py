"""How a chosen front member is trained again at the full budget: which members
(`choose_trials`), the options the command line gives (`RetrainOptions`), each member's plan
(`run_plan`: its TrainConfig for the run's epochs and batches per epoch with no time limit, the
run's identity, and with --continue the checkpoint it goes on from, checked to belong to that
run), and the training itself, from scratch or from that checkpoint (`train_member`). The
retrain on the search's split (nas.evaluation.retrain) and on every case
(nas.evaluation.all_cases) share it; both record in `<study>-retrain` (`retrain_study_of`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.search.weights import all_cases_path, latest_checkpoint_path, retrained_path

# Epochs between two checkpoints, unless --checkpoint-every says otherwise.
CHECKPOINT_EVERY = 10

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.data import Case, DataConfig, Dataset
    from nas.search.trial_files import TrialFiles
    from nas.training.fit import ValidationPlan
    from nas.training.resumable import Checkpoint
    from nas.training.train_config import TrainConfig


@dataclass(frozen=True)
class RetrainOptions:
    """What `nas retrain` was asked for: the study's results folder, the trial files read and
    written through its artifact store when it has one, and the options (None: not given)."""

    results: Path
    files: TrialFiles
    epochs: int | None = None
    batches_per_epoch: int | None = None
    checkpoint_every: int | None = None
    continue_run: bool = False
    all_cases: bool = False
    folds: str | None = None
    workers: int = 1


def choose_trials(study: optuna.Study, top: int, numbers: str | None) -> list[FrozenTrial]:
    """The members to train again: the trials `numbers` names (--trials, each COMPLETE), or
    the `top` front members of highest IoU."""
    from optuna.trial import TrialState

    from nas.search.record import TrialRecord
    from nas.search.results import pareto_front

    if numbers is None:
        front = pareto_front(study)
        if not front:
            raise NasError(study.study_name, "has no completed trial to retrain")
        return sorted(front, key=lambda t: -(TrialRecord.of(t).iou or 0.0))[:top]
    by_number = {t.number: t for t in study.trials}
    chosen = []
    for text in numbers.split(","):
        try:
            trial = by_number[int(text)]
        except (ValueError, KeyError):
            raise NasError(
                "--trials", f"study {study.study_name!r} has no trial {text!r}"
            ) from None
        if trial.state != TrialState.COMPLETE:
            raise NasError("--trials", f"trial {trial.number} is {trial.state.name}, not COMPLETE")
        chosen.append(trial)
    return chosen


def retrain_study_of(study: optuna.Study, storage: str) -> optuna.Study:
    """`<study>-retrain` in the search's storage, with the search's objectives."""
    from nas.search.companions import open_retrain_study
    from nas.search.record import study_objectives
    from nas.search.storage import open_storage

    return open_retrain_study(
        open_storage(storage, access="existing"), study.study_name, study_objectives(study).names
    )


def run_plan(
    options: RetrainOptions, study: optuna.Study, trial: FrozenTrial, data_cfg: DataConfig
) -> tuple[TrainConfig, dict, Checkpoint | None]:
    """How `trial` is trained: its TrainConfig (the search's, for the run's epochs and
    batches per epoch, with no time limit), the run's identity, and with --continue the
    checkpoint it goes on from, checked to belong to that run (the epochs, batches per epoch
    and checkpoint interval not given are the checkpoint's)."""
    from pydantic import ValidationError

    from nas.search.record import TrialRecord
    from nas.training.resumable import check_identity, read_checkpoint

    record = TrialRecord.of(trial)
    search_train = record.train()
    path = latest_path(options, trial.number)
    start, recorded = None, {}
    if options.continue_run:
        if options.files.local(path) is None:  # written here, or by another host of the study
            raise NasError(
                "--continue",
                f"trial {trial.number} has no checkpoint to continue ({path}); "
                "retrain it without --continue",
            )
        start = read_checkpoint(path)
        recorded = start.identity
    if options.all_cases:
        default_epochs = record.epochs_run or search_train.epochs
    else:
        default_epochs = 3 * search_train.epochs
    epochs = options.epochs or recorded.get("epochs") or default_epochs
    batches = (
        options.batches_per_epoch
        or recorded.get("batches_per_epoch")
        or search_train.batches_per_epoch
    )
    try:
        train = dataclasses.replace(
            search_train, epochs=epochs, batches_per_epoch=batches, max_seconds=None
        )
    except ValidationError as err:  # beyond TrainConfig's bounds
        problem = err.errors()[0]
        raise NasError(f"--{str(problem['loc'][0]).replace('_', '-')}", problem["msg"]) from None
    identity = {
        "study": study.study_name,
        "trial": trial.number,
        "all_cases": bool(options.all_cases),
        "fold": None if options.all_cases else data_cfg.fold,
        "seed": train.seed,
        "epochs": epochs,
        "batches_per_epoch": batches,
        "checkpoint_every": (
            options.checkpoint_every or recorded.get("checkpoint_every") or CHECKPOINT_EVERY
        ),
    }
    if start is not None:
        check_identity(path, start.identity, identity)
    return train, identity, start


def latest_path(options: RetrainOptions, trial_number: int) -> Path:
    """The checkpoint of a member's retrain (with --all-cases, of its all-cases training)."""
    final = all_cases_path if options.all_cases else retrained_path
    return latest_checkpoint_path(final(options.results, trial_number))


def write_last_checkpoint(options: RetrainOptions, trial_number: int, end: Checkpoint) -> None:
    """A member's last checkpoint, written (and shared) once its run is recorded: a run killed
    before this point is trained again by --continue, not skipped as finished."""
    from nas.training.resumable import write_checkpoint

    path = latest_path(options, trial_number)
    write_checkpoint(path, end)
    options.files.publish(path)


def train_member(
    options: RetrainOptions,
    trial: FrozenTrial,
    plan: tuple[TrainConfig, dict, Checkpoint | None],
    cases: tuple[Sequence[Case], Sequence[Case]],
    dataset: Dataset,
    data_cfg: DataConfig,
    device: torch.device,
    validation: ValidationPlan | None = None,
) -> tuple[torch.nn.Module, Checkpoint] | None:
    """Train one member as `plan` (`run_plan`) says, from scratch or from its checkpoint,
    writing checkpoints as it goes: the network and the run's last checkpoint (for the
    caller to write once the run's results are saved). None: its run had finished. Raises
    CandidateFailed as `fit` does."""
    from nas.core.staging import remove_stale_staging
    from nas.search.record import TrialRecord
    from nas.training.fit import EVERY_EPOCH
    from nas.training.resumable import train_resumable
    from nas.training.start import starting_model

    train, identity, start = plan
    path = latest_path(options, trial.number)
    if start is not None and start.finished:
        print(f"  its run finished ({start.epoch} epochs): nothing to continue")
        return None
    remove_stale_staging(path.parent)  # what a killed run was writing
    unet = TrialRecord.of(trial).unet()
    if start is not None:
        print(f"  continuing from the checkpoint at epoch {start.epoch} ({start.steps:,} steps)")
    else:
        options.files.drop(path)  # a fresh run: no checkpoint of an earlier one is continued
    model = starting_model(unet, train, resumed=start is not None)  # start's weights go in
    # Every training slice: the search may have used a few per case.
    slicing = dataclasses.replace(data_cfg.slicing, per_case=None)
    say = functools.partial(print, flush=True)  # a line per epoch, at once even into a log
    end = train_resumable(model, *cases, dataset.scheme, train, device, slicing,
                          path, identity, start, say,
                          validation or EVERY_EPOCH, options.files.publish)  # fmt: skip
    return model, end
