"""Train one candidate from a given state for a given number of epochs: no Optuna, no storage.

The unit of work of a multi-fidelity search. A candidate trains a segment (up to a rung),
stops with its state — weights, optimizer moments, the epoch reached — and may later be
promoted and continue from exactly that state, in the same process or another one. The
weights alone are the checkpoint that export, retrain and predict read (`trial_NNNN.pt`); the
rest of the state sits beside them (`trial_NNNN.state.pt`) until the candidate can no longer be
promoted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nas.core.staging import atomic_write
from nas.data import Case, Slicing
from nas.data.labels import LabelScheme
from nas.network.builder import UNet
from nas.search.candidate import Candidate
from nas.search.results import state_path
from nas.training.fit import (
    EVERY_EPOCH,
    EpochResult,
    FitResult,
    ValidationPlan,
    fit,
)
from nas.training.start import starting_model


@dataclass(frozen=True)
class TrainingData:
    train_cases: Sequence[Case]
    val_cases: Sequence[Case]
    scheme: LabelScheme  # what the network outputs: its out_channels, loss and scores
    slicing: Slicing
    data_workers: int | None = None  # batch workers (nas.training.batches; None: for the device)


@dataclass(frozen=True)
class TrainingState:
    """Where a candidate's training stands: continue it with `train_candidate`."""

    epoch: int  # epochs trained so far, each `batches_per_epoch` optimiser steps
    weights: dict[str, torch.Tensor]
    optimizer: dict


@dataclass(frozen=True)
class Outcome:
    fit: FitResult  # this segment's epochs, scores after its last one
    state: TrainingState  # to continue from
    model: UNet  # the trained network (on the training device)


def train_candidate(
    candidate: Candidate,
    data: TrainingData,
    device: torch.device,
    until_epoch: int,
    state: TrainingState | None = None,
    on_epoch: Callable[[EpochResult], bool | None] | None = None,
    validation: ValidationPlan = EVERY_EPOCH,
) -> Outcome:
    """Train `candidate` from `state` (None: fresh weights, from its seed or its
    init_weights) until `until_epoch` or until `on_epoch` answers False, validating as
    `validation` says. Raises CandidateFailed as `fit` does."""
    model = starting_model(candidate.unet, candidate.train, resumed=state is not None)
    if state is not None:
        model.load_state_dict(state.weights)
    result = fit(
        model,
        data.train_cases,
        data.val_cases,
        data.scheme,
        candidate.train,
        device,
        on_epoch,
        data.slicing,
        start_epoch=state.epoch if state else 0,
        until_epoch=until_epoch,
        optimizer_state=state.optimizer if state else None,
        validation=validation,
        data_workers=data.data_workers,
    )
    reached = result.history[-1].epoch
    return Outcome(
        result, TrainingState(reached, model.state_dict(), result.optimizer_state), model
    )


def save_state(weights: Path, state: TrainingState) -> None:
    """The optimizer state and epoch beside already saved weights (renamed into place)."""
    payload = {"epoch": state.epoch, "optimizer": state.optimizer}
    atomic_write(state_path(weights), lambda tmp: torch.save(payload, tmp))


def load_state(weights: Path, device: torch.device) -> TrainingState:
    """The state saved by `save_state` with the weights it belongs to; OSError or
    RuntimeError when either file is missing or unreadable."""
    tensors = torch.load(weights, map_location=device, weights_only=True)
    payload = torch.load(state_path(weights), map_location=device, weights_only=True)
    return TrainingState(int(payload["epoch"]), tensors, payload["optimizer"])
