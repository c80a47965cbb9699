"""Train one candidate from a given state for a given number of epochs: no Optuna, no storage,
no files.

The unit of work of a multi-fidelity search. A candidate trains a segment (up to a rung),
stops with its state — weights, optimizer moments, the epoch reached — and may later be
promoted and continue from exactly that state, in the same process or another one. Where
that state is kept between segments (`trial_NNNN.pt` and `trial_NNNN.state.pt`) is
nas/search/weights.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nas.data import Case, Slicing
from nas.data.labels import LabelScheme
from nas.network.builder import UNet
from nas.training.fit import (
    EVERY_EPOCH,
    EpochResult,
    FitResult,
    ValidationPlan,
    fit,
)
from nas.training.start import starting_model

if TYPE_CHECKING:
    from nas.search.candidate import Candidate  # a search's configs; no Optuna at run time


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
