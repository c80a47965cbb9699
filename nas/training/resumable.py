"""A long training run that survives a kill: trained in segments between checkpoints, and
continued from the last checkpoint (nnU-Net's `--c`). nas.retrain's full-length training.

A checkpoint holds the weights, the optimizer state, the epoch and optimiser steps reached,
each epoch's loss and scores, the best validation IoU so far with its epoch and weights, and
the run's identity (whose network, which data, epochs, batches per epoch, seed): what a
continuation must match. It is written under a temporary name and renamed into place, so a
kill mid-write leaves the previous checkpoint whole, and read back with weights_only=True, so
it holds tensors, numbers, strings and plain containers only. Segments end at multiples of
the checkpoint interval and each draws its batches from its first epoch (`fit`'s seeding),
and the learning rate decays over the whole run: a continued run takes the steps, batches
and learning rates of one never stopped. Knows nothing of Optuna; what it would print goes
to the caller's `report`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.core.errors import NasError
from nas.core.staging import atomic_write
from nas.data import Case, Slicing
from nas.data.labels import LabelScheme
from nas.training.fit import EVERY_EPOCH, EpochResult, ValidationPlan, fit
from nas.training.train_config import TrainConfig

# The power of nas.training.fit's polynomial learning-rate decay (nnU-Net's), which `continued`
# carries across segments.
POLY_DECAY_POWER = 0.9

# The settings that decide a run, in the order a mismatch is named, and how a user names them.
IDENTITY = {
    "study": "study",
    "trial": "trial",
    "all_cases": "--all-cases",
    "fold": "validation fold",
    "seed": "seed",
    "epochs": "--epochs",
    "batches_per_epoch": "--batches-per-epoch",
}


@dataclass(frozen=True)
class Best:
    """The weights at the epoch of the highest validation IoU so far (on the CPU)."""

    epoch: int
    iou: float
    dice: float
    weights: dict[str, torch.Tensor]

    def scores(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "iou": self.iou, "dice": self.dice}


@dataclass(frozen=True)
class Checkpoint:
    """Where a run stands after `epoch` epochs of `identity["epochs"]`."""

    # IDENTITY's keys, and checkpoint_every: not compared (a continuation may checkpoint
    # more or less often), but a continuation that keeps it draws the same batches.
    identity: dict[str, Any]
    epoch: int
    steps: int  # optimiser steps taken, every session together
    seconds: float  # spent training and validating, every session together
    weights: dict[str, torch.Tensor]
    optimizer: dict
    # Per epoch: epoch, train_loss, val_iou, val_dice and val_case_dice (None: nothing
    # validated), seconds.
    history: tuple[dict[str, Any], ...] = ()
    best: Best | None = None  # None: nothing validated yet, or nothing to validate on

    @property
    def finished(self) -> bool:
        return self.epoch >= self.identity["epochs"]


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    best = checkpoint.best
    payload = {
        "identity": dict(checkpoint.identity),
        "epoch": checkpoint.epoch,
        "steps": checkpoint.steps,
        "seconds": checkpoint.seconds,
        "weights": checkpoint.weights,
        "optimizer": checkpoint.optimizer,
        "history": [dict(row) for row in checkpoint.history],
        "best": None if best is None else {**best.scores(), "weights": best.weights},
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at `path` (tensors on the CPU), or a NasError naming the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        best = payload["best"]
        return Checkpoint(
            identity=dict(payload["identity"]),
            epoch=int(payload["epoch"]),
            steps=int(payload["steps"]),
            seconds=float(payload["seconds"]),
            weights=payload["weights"],
            optimizer=payload["optimizer"],
            history=tuple(payload["history"]),
            best=None if best is None else Best(**best),
        )
    except FileNotFoundError:
        raise NasError(path, "not found") from None
    except Exception as err:  # a damaged file, or another kind of .pt
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NasError(path, f"is not a checkpoint nas retrain can continue ({reason})") from None


def check_identity(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """A NasError naming the first setting in which the run checkpointed at `path` differs
    from the run to continue."""
    for key, name in IDENTITY.items():
        if found.get(key) != expected[key]:
            raise NasError(
                "--continue",
                f"{path} holds a run with {name} {found.get(key)!r}, not {expected[key]!r}; "
                "give the settings it was started with, or start afresh without --continue",
            )


def continued(cfg: TrainConfig, start_epoch: int) -> TrainConfig:
    """`cfg` for a segment from `start_epoch` whose learning rate goes on decaying as the
    whole run's does. fit decays it over the steps it is asked to train, lr (1 - s/S)^p
    after s of S, so a segment alone would start the decay again. The run's rate after
    s0 + s of its N steps, lr (1 - (s0 + s)/N)^p, equals lr ((N - s0)/N)^p (1 - s/(N - s0))^p:
    fit's own decay over the N - s0 steps left, from a rate scaled by ((N - s0)/N)^p."""
    left = (cfg.epochs - start_epoch) / cfg.epochs
    return dataclasses.replace(cfg, learning_rate=cfg.learning_rate * left**POLY_DECAY_POWER)


@dataclass
class _Progress:
    """What the run has done so far, and the line each epoch prints."""

    epochs: int
    validates: bool
    report: Callable[[str], None]
    history: list[dict[str, Any]]
    best: Best | None
    start: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)
    epochs_here: int = 0  # in this session, for the time left

    def after_epoch(self, model: nn.Module, result: EpochResult) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.epochs_here += 1
        scores = result.scores if self.validates else None
        iou, dice, case_dice = (
            (scores.iou, scores.dice, scores.case_dice) if scores is not None else (None,) * 3
        )
        row = {"epoch": result.epoch, "train_loss": result.train_loss, "val_iou": iou,
               "val_dice": dice, "val_case_dice": case_dice,
               "seconds": round(seconds, 3)}  # fmt: skip
        self.history.append(row)
        if iou is not None and math.isfinite(iou) and (self.best is None or iou > self.best.iou):
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best = Best(result.epoch, iou, dice, weights)
        line = f"  epoch {result.epoch}/{self.epochs}: loss {result.train_loss:.4f}"
        if iou is not None:
            line += f", val IoU {iou:.4f} (best {self.best.iou:.4f}, epoch {self.best.epoch})"
        left = (now - self.start) / self.epochs_here * (self.epochs - result.epoch)
        left_text = datetime.timedelta(seconds=round(left))
        self.report(f"{line}, {seconds:.1f} s/epoch, {left_text} left")


def train_resumable(
    model: nn.Module,
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    scheme: LabelScheme,
    cfg: TrainConfig,
    device: torch.device,
    slicing: Slicing,
    path: Path,
    identity: dict[str, Any],
    start: Checkpoint | None = None,
    report: Callable[[str], None] = print,
    validation: ValidationPlan = EVERY_EPOCH,
    written: Callable[[Path], None] = lambda path: None,
) -> Checkpoint:
    """Train `model` in place for cfg.epochs of cfg.batches_per_epoch steps, from `start`
    (None: from the model as given), validating every epoch as `validation` says (on whole
    cases, or on the search's fixed patches). A checkpoint of the run
    `identity` names is written to `path` every identity["checkpoint_every"] epochs before
    the last, and `written(path)` called (to share it with other hosts); the last one is
    returned, for the caller to write once it has saved what the run produced. Raises
    CandidateFailed as `fit` does."""
    every = identity["checkpoint_every"]
    if start is not None and start.finished:
        raise ValueError(f"the run checkpointed at {path} has finished: nothing to train")
    if start is not None:
        model.load_state_dict(start.weights)
    epoch = start.epoch if start else 0
    steps = start.steps if start else 0
    seconds = start.seconds if start else 0.0
    optimizer = start.optimizer if start else None
    history = list(start.history) if start else []
    progress = _Progress(cfg.epochs, bool(val_cases), report, history, start and start.best)
    reached = start
    while epoch < cfg.epochs:
        until = min((epoch // every + 1) * every, cfg.epochs)

        def after_epoch(result: EpochResult, until: int = until) -> bool:
            progress.after_epoch(model, result)
            return result.epoch < until  # False: the segment ends here

        # Asked to train until the run's end, fit decays the learning rate to its end.
        segment = continued(cfg, epoch)
        result = fit(model, train_cases, val_cases, scheme, segment, device, after_epoch,
                     slicing, start_epoch=epoch, optimizer_state=optimizer,
                     validation=validation)  # fmt: skip
        epoch, optimizer = result.history[-1].epoch, result.optimizer_state
        steps, seconds = steps + result.steps, seconds + result.seconds
        reached = Checkpoint(identity, epoch, steps, round(seconds, 3), model.state_dict(),
                             optimizer, tuple(progress.history), progress.best)  # fmt: skip
        if epoch < cfg.epochs:
            write_checkpoint(path, reached)
            written(path)
            report(f"  checkpoint at epoch {epoch}: {path}")
    return reached
