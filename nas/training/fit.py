"""Train one candidate network and report validation scores after the epochs asked for.

A plain loop: take the next batch (built in background workers, nas.training.batches),
forward, Dice+CE loss (Dice+BCE per region for a region-based dataset), backward, step, on
the device the caller chose (nas/network/device.py); AMP and channels-last are used only on
CUDA. Training can run in segments (the rungs of a multi-fidelity search): `fit` continues
from a given epoch and optimizer state, and the learning rate decays polynomially over each
segment, whichever of its epochs or seconds runs out first (warm restarts, as in SGDR), so
the weights at the end of every segment are annealed. Validation follows every epoch, or
only the epochs a `ValidationPlan` names (and always a segment's last), on whole cases or on
a search's fixed validation patches. A candidate that runs out of memory or diverges raises
`CandidateFailed`. Knows nothing of Optuna: the caller sees each epoch through `on_epoch`,
whose answer False stops training there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nas.core.errors import NasError
from nas.data import Case, Slicing
from nas.data.labels import LabelScheme
from nas.network.builder import UNet, UNetConfig, build_unet
from nas.network.device import memory_format, prepare_model
from nas.network.precision import autocast, gradient_scaler
from nas.training.batches import default_workers, training_batches
from nas.training.losses import make_loss
from nas.training.train_config import TrainConfig
from nas.validation.validate import (
    NO_VALIDATION,
    Scores,
    ValidationPatches,
    evaluate,
    evaluate_patches,
)


class CandidateFailed(Exception):
    """The candidate cannot be trained (out of memory, non-finite loss or weights); `reason`
    says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class ValidationPlan:
    """How `fit` validates: after the epochs in `epochs` (None: every epoch), and always
    after a segment's last; on `patches` (None: the whole validation cases)."""

    epochs: Container[int] | None = None
    patches: ValidationPatches | None = None

    def after(self, epoch: int) -> bool:
        """Whether `epoch` is validated (a segment's last always is, whatever this says)."""
        return self.epochs is None or epoch in self.epochs


# Whole validation cases after every epoch: what retraining and cross-validation use.
EVERY_EPOCH = ValidationPlan()


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    scores: Scores | None  # None: not validated after this epoch
    train_seconds: float  # in this epoch's training steps, data sampling included
    seconds: float  # since training started, validation included


@dataclass(frozen=True)
class FitResult:
    scores: Scores  # after the last epoch
    history: tuple[EpochResult, ...]  # this call's epochs
    seconds: float
    stopped_by_time: bool
    optimizer_state: dict  # to continue training from the last epoch
    steps: int  # optimiser steps taken in this call


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.learning_rate,
            momentum=0.99,
            nesterov=True,
            weight_decay=cfg.weight_decay,
        )
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def init_model(unet: UNetConfig, seed: int) -> UNet:
    """The network with initial weights drawn from `seed` alone, so that a trial trains the
    same way whatever ran before it in the process (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_unet(unet)


def initial_model(unet: UNetConfig, cfg: TrainConfig) -> UNet:
    """The network a training run starts from: random weights from `cfg.seed`, or where
    `cfg.init_weights` names a checkpoint, its tensors (fine-tuning). A checkpoint that does
    not fit this network fails the candidate, naming the first tensor that differs."""
    model = init_model(unet, cfg.seed)
    if cfg.init_weights is not None:
        from nas.network.state_dict import load_weights

        try:
            load_weights(model, Path(cfg.init_weights))
        except NasError as err:
            raise CandidateFailed(f"init_weights: {err.reason}") from None
    return model


def device_batch(
    batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A host batch as tensors on `device`: images (in the memory format `prepare_model`
    gives the network there), labels; the copy overlaps the step where the batch is pinned."""
    images, labels = batch
    fmt = memory_format(images.dim() - 2, device)
    images = images.to(device, non_blocking=True, memory_format=fmt)
    return images, labels.to(device, non_blocking=True)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimisation step, the forward pass under autocast on CUDA (nas.network.precision) and
    the loss scaled where float16 needs it; returns the detached loss (no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device):
        loss = loss_fn(model(images), labels)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def is_out_of_memory(err: BaseException) -> bool:
    # Python raises MemoryError where a host allocation outside torch's allocator fails
    # (numpy batches, pinned buffers).
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError)
        and ("out of memory" in str(err) or "can't allocate memory" in str(err))
    )


def out_of_memory_reason(err: BaseException) -> str:
    """The fail reason of an out-of-memory error, in one line."""
    # Python's MemoryError usually carries no message.
    return f"out of memory: {(str(err).splitlines() or [type(err).__name__])[0]}"


def _weights_are_finite(model: nn.Module) -> bool:
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    # One flag per tensor, stacked: a single wait for the device instead of one per tensor.
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def fit(
    model: nn.Module,
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    scheme: LabelScheme,
    cfg: TrainConfig,
    device: torch.device,
    on_epoch: Callable[[EpochResult], bool | None] | None = None,
    slicing: Slicing | None = None,
    start_epoch: int = 0,
    until_epoch: int | None = None,
    optimizer_state: dict | None = None,
    validation: ValidationPlan = EVERY_EPOCH,
    data_workers: int | None = None,
) -> FitResult:
    """Train `model` in place and validate as `validation` says: by default on whole cases
    after every epoch (no validation cases: each epoch scores NO_VALIDATION).

    scheme: what the network outputs (classes or regions): its loss and its scores.
    slicing: the slice axis (and slice budget) 2D networks train and predict with.
    start_epoch, until_epoch: the segment to train, epochs start_epoch + 1 .. until_epoch
        (default: all of cfg.epochs); a continued segment passes the optimizer state the
        previous one returned. `cfg.max_seconds` caps each segment.
    data_workers: batch worker processes (nas.training.batches; None: `default_workers`).
    on_epoch: called after each epoch (validated or not); answering False stops training.
    """
    slicing = slicing or Slicing()
    spatial_dims = model.config.spatial_dims
    until_epoch = cfg.epochs if until_epoch is None else until_epoch
    if not 0 <= start_epoch < until_epoch:
        raise ValueError(f"no epochs to train from {start_epoch} until {until_epoch}")
    # Each segment draws its own batches, reproducibly.
    seed = cfg.seed + 7919 * start_epoch
    torch.manual_seed(seed)
    model = prepare_model(model, spatial_dims, device)
    patch_size = cfg.patch_size(spatial_dims)
    validate = functools.partial(_validate, model, val_cases, scheme, patch_size, device,
                                 slicing, validation.patches)  # fmt: skip
    workers = default_workers(device) if data_workers is None else data_workers
    batches = training_batches(train_cases, cfg, spatial_dims, seed, slicing, device, workers)
    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    loss_fn, scaler = make_loss(scheme), gradient_scaler(device)
    clock = _SegmentClock((until_epoch - start_epoch) * cfg.batches_per_epoch, cfg.max_seconds)
    train_epoch = functools.partial(_train_epoch, model, optimizer, loss_fn, batches, cfg, device,
                                    scaler, clock)  # fmt: skip
    try:
        model.train()
        epochs = range(start_epoch + 1, until_epoch + 1)
        history = _train_epochs(epochs, train_epoch, model, clock, validate, validation, on_epoch)
    except Exception as err:
        if is_out_of_memory(err):
            raise CandidateFailed(out_of_memory_reason(err)) from err
        raise
    finally:
        del batches, train_epoch  # stops the workers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _segment_result(history, validate, clock, optimizer)


def _segment_result(
    history: list[EpochResult],
    validate: Callable[[], Scores],
    clock: _SegmentClock,
    optimizer: torch.optim.Optimizer,
) -> FitResult:
    """What a segment trained, its last epoch validated (where `on_epoch` stopped it before
    it was); CandidateFailed where its time ended before the first step."""
    if not history:
        raise CandidateFailed("the time budget ended before the first training step")
    if history[-1].scores is None:  # stopped by on_epoch where it was not validated
        history[-1] = dataclasses.replace(history[-1], scores=validate())
    return FitResult(history[-1].scores, tuple(history), clock.elapsed(), clock.stopped_by_time,
                     optimizer.state_dict(), clock.steps_taken)  # fmt: skip


def _train_epochs(
    epochs: range,
    train_epoch: Callable[[], tuple[torch.Tensor, int]],
    model: nn.Module,
    clock: _SegmentClock,
    validate: Callable[[], Scores],
    validation: ValidationPlan,
    on_epoch: Callable[[EpochResult], bool | None] | None,
) -> list[EpochResult]:
    """A segment's epochs, each validated where `validation` says (and the last one always),
    until the segment's end, its time, or `on_epoch` answering False."""
    history: list[EpochResult] = []
    for epoch in epochs:
        epoch_start = time.perf_counter()
        loss_sum, steps = train_epoch()
        if steps == 0:
            break
        train_loss = float(loss_sum) / steps  # waits for the device: timing is complete
        train_seconds = time.perf_counter() - epoch_start
        _check_finite(model, train_loss, epoch)
        last = epoch == epochs[-1] or clock.time_up()
        scores = validate() if last or validation.after(epoch) else None
        result = EpochResult(epoch, train_loss, scores, train_seconds, clock.elapsed())
        history.append(result)
        if (on_epoch is not None and on_epoch(result) is False) or clock.stopped_by_time:
            break
    return history


def _validate(
    model: nn.Module,
    val_cases: Sequence[Case],
    scheme: LabelScheme,
    patch_size: tuple[int, ...],
    device: torch.device,
    slicing: Slicing,
    patches: ValidationPatches | None,
) -> Scores:
    if patches is not None:
        return evaluate_patches(model, patches, scheme, patch_size, device)
    if not val_cases:
        return NO_VALIDATION
    return evaluate(model, val_cases, scheme, patch_size, device, slicing.axis)


@dataclass
class _SegmentClock:
    """How far a segment of training has gone: optimiser steps of `total_steps`, and seconds
    within `max_seconds` (None: no cap), which set the learning rate's polynomial decay."""

    total_steps: int
    max_seconds: float | None
    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps_taken: int = 0
    stopped_by_time: bool = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_up(self) -> bool:
        """Whether the segment's time is up (and so stopped_by_time)."""
        if self.max_seconds is not None and self.elapsed() >= self.max_seconds:
            self.stopped_by_time = True
        return self.stopped_by_time

    def fraction(self) -> float | None:
        """The share of the segment done, by steps or by time, whichever is further; None
        (and stopped_by_time) once the time is up."""
        elapsed = self.elapsed()
        fraction = self.steps_taken / self.total_steps
        if self.max_seconds is not None:
            if elapsed >= self.max_seconds:
                self.stopped_by_time = True
                return None
            fraction = max(fraction, elapsed / self.max_seconds)
        return fraction


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    scaler: torch.amp.GradScaler | None,
    clock: _SegmentClock,
) -> tuple[torch.Tensor, int]:
    """One epoch's steps (fewer when the segment's time is up): the summed loss, on the
    device, and how many steps were taken."""
    loss_sum = torch.zeros((), device=device)
    steps = 0
    for _ in range(cfg.batches_per_epoch):
        fraction = clock.fraction()
        if fraction is None:
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * (1 - fraction) ** 0.9
        images, labels = device_batch(next(batches), device)
        loss_sum += train_step(model, optimizer, loss_fn, images, labels, scaler)
        steps += 1
        clock.steps_taken += 1
    return loss_sum, steps


def _check_finite(model: nn.Module, train_loss: float, epoch: int) -> None:
    if not math.isfinite(train_loss):
        raise CandidateFailed(f"non-finite training loss ({train_loss}) in epoch {epoch}")
    # The loss is computed before each step, so a step that diverges shows only here.
    if not _weights_are_finite(model):
        raise CandidateFailed(f"non-finite weights after training (epoch {epoch})")
