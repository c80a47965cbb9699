"""Train one candidate network and report validation scores after every epoch.

A plain loop: sample a batch, forward, Dice+CE loss (Dice+BCE per region for a region-based
dataset), backward, step. The device is chosen once (cuda, then mps, then cpu); AMP and
channels-last are used only on CUDA. Training can run in segments (the rungs of a
multi-fidelity search): `fit` continues from a given epoch and optimizer state, and the
learning rate decays polynomially over each segment, whichever of its epochs or seconds runs
out first (warm restarts, as in SGDR), so the weights at the end of every segment are
annealed. A candidate that runs out of memory or diverges raises `CandidateFailed`. Knows
nothing of Optuna: the caller sees each epoch through `on_epoch`, whose answer False stops
training there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass as config_dataclass
from torch import nn

from nas.builder import UNet, UNetConfig, build_unet
from nas.data import Case, PatchSampler, Slicing
from nas.labels import LabelScheme
from nas.losses import DeepSupervisionLoss, make_loss
from nas.validate import Scores, evaluate

# The largest patch per axis: a whole 1024^2 slice (the largest common CT/MR matrix) in 2D, a
# whole 512^3 volume in 3D; larger would have to be mostly padding on any real scan.
MAX_PATCH_SIZE = {2: 1024, 3: 512}


@config_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class TrainConfig:
    """How one candidate is trained.

    batches_per_epoch: training batches between two validations.
    batch_size_2d / patch_size_2d: slices per batch and in-plane slice crop, for 2D networks.
    batch_size_3d / patch_size_3d: patches per batch and patch size (X, Y, Z), for 3D networks.
        A search space may leave these four to `auto`; nas.patch_plan turns that into sizes
        before any trial, so a TrainConfig never holds it.
    foreground_fraction: share of samples centred on a foreground voxel.
    augment: flips, intensity scaling by up to +-intensity_scale and in-plane rotations by up
        to +-rotation_deg.
    max_seconds: the trial's training budget in wall-clock seconds (None: epochs only).
    """

    # Upper bounds, so that a typo fails one config instead of exhausting the machine; nnU-Net
    # trains 1000 epochs of 250 batches of 2 (3D) to 50 (2D) samples.
    epochs: int = Field(8, ge=1, le=100_000)
    batches_per_epoch: int = Field(25, ge=1, le=100_000)
    batch_size_2d: int = Field(16, ge=1, le=1024)
    batch_size_3d: int = Field(2, ge=1, le=1024)
    patch_size_2d: tuple[int, int] = (64, 64)
    patch_size_3d: tuple[int, int, int] = (48, 48, 32)
    foreground_fraction: float = Field(0.33, ge=0.0, le=1.0)
    augment: bool = True
    rotation_deg: float = Field(15.0, ge=0.0, le=180.0)
    intensity_scale: float = Field(0.1, ge=0.0, lt=1.0)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    max_seconds: float | None = Field(None, gt=0.0)
    seed: int = 0

    @field_validator(
        "batch_size_2d", "batch_size_3d", "patch_size_2d", "patch_size_3d", mode="before"
    )
    @classmethod
    def _refuse_auto(cls, value: object, info: ValidationInfo) -> object:
        # The trainer must see the sizes it trains with; "auto" belongs to the search space.
        if isinstance(value, str) and value == "auto":
            raise ValueError(
                f"{info.field_name} is 'auto': plan it from the dataset first "
                "(nas.patch_plan.plan_patches)"
            )
        return value

    @field_validator("patch_size_2d", "patch_size_3d")
    @classmethod
    def _check_patch_size(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        limit = MAX_PATCH_SIZE[len(value)]
        if not all(1 <= size <= limit for size in value):
            raise ValueError(
                f"{info.field_name} must be between 1 and {limit} per axis, got {value}"
            )
        return value

    def patch_size(self, spatial_dims: int) -> tuple[int, ...]:
        """The training patch (and inference window) of a 2D or 3D network."""
        return self.patch_size_2d if spatial_dims == 2 else self.patch_size_3d

    def batch_size(self, spatial_dims: int) -> int:
        return self.batch_size_2d if spatial_dims == 2 else self.batch_size_3d


def training_loss(unet: UNetConfig, scheme: LabelScheme) -> nn.Module:
    """The loss `fit` trains `unet` with: per region or over classes, and over every output
    of a deeply supervised network."""
    loss = make_loss(scheme)
    return DeepSupervisionLoss(loss) if unet.deep_supervision else loss


class CandidateFailed(Exception):
    """The candidate cannot be trained (out of memory, non-finite loss or weights); `reason`
    says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    scores: Scores
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


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for "auto"; an explicit choice must be available."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None
        and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available.get(requested, False):
        raise ValueError(f"device {requested!r} is not available on this machine")
    return torch.device(requested)


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


def prepare_model(model: nn.Module, spatial_dims: int, device: torch.device) -> nn.Module:
    """Move to `device`; channels-last memory format on CUDA, where it speeds up convolutions."""
    model = model.to(device)
    if device.type == "cuda":
        fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    return model


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimisation step; returns the detached loss (no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # CUDA: mixed precision
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss = loss_fn(model(images), labels)
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
) -> FitResult:
    """Train `model` in place and validate on whole cases after every epoch.

    scheme: what the network outputs (classes or regions): its loss and its scores.
    slicing: the slice axis (and slice budget) 2D networks train and predict with.
    start_epoch, until_epoch: the segment to train, epochs start_epoch + 1 .. until_epoch
        (default: all of cfg.epochs); a continued segment passes the optimizer state the
        previous one returned. `cfg.max_seconds` caps each segment.
    on_epoch: called after each epoch's validation; returning False stops training there.
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
    sampler = PatchSampler(
        train_cases,
        patch_size,
        cfg.batch_size(spatial_dims),
        cfg.foreground_fraction,
        cfg.augment,
        seed,
        slicing,
        cfg.rotation_deg,
        cfg.intensity_scale,
    )
    optimizer = make_optimizer(model, cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    loss_fn = training_loss(model.config, scheme)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    memory_format = (
        (torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
        if device.type == "cuda"
        else torch.contiguous_format
    )
    total_steps = (until_epoch - start_epoch) * cfg.batches_per_epoch
    history: list[EpochResult] = []
    start = time.perf_counter()
    stopped_by_time = False
    steps_taken = 0
    try:
        model.train()
        for epoch in range(start_epoch + 1, until_epoch + 1):
            loss_sum = torch.zeros((), device=device)
            steps = 0
            epoch_start = time.perf_counter()
            for _ in range(cfg.batches_per_epoch):
                elapsed = time.perf_counter() - start
                fraction = steps_taken / total_steps
                if cfg.max_seconds is not None:
                    if elapsed >= cfg.max_seconds:
                        stopped_by_time = True
                        break
                    fraction = max(fraction, elapsed / cfg.max_seconds)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.learning_rate * (1 - fraction) ** 0.9
                images, labels = sampler.sample()
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                loss_sum += train_step(model, optimizer, loss_fn, images, labels, scaler)
                steps += 1
                steps_taken += 1
            if steps == 0:
                break
            train_loss = float(loss_sum) / steps  # waits for the device: timing is complete
            train_seconds = time.perf_counter() - epoch_start
            if not math.isfinite(train_loss):
                raise CandidateFailed(f"non-finite training loss ({train_loss}) in epoch {epoch}")
            # The loss is computed before each step, so a step that diverges shows only here.
            if not _weights_are_finite(model):
                raise CandidateFailed(f"non-finite weights after training (epoch {epoch})")
            scores = evaluate(model, val_cases, scheme, patch_size, device, slicing.axis)
            result = EpochResult(
                epoch, train_loss, scores, train_seconds, time.perf_counter() - start
            )
            history.append(result)
            if on_epoch is not None and on_epoch(result) is False:
                break
            if stopped_by_time:
                break
    except Exception as err:
        if is_out_of_memory(err):
            raise CandidateFailed(out_of_memory_reason(err)) from err
        raise
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not history:
        raise CandidateFailed("the time budget ended before the first training step")
    return FitResult(
        history[-1].scores,
        tuple(history),
        time.perf_counter() - start,
        stopped_by_time,
        optimizer.state_dict(),
        steps_taken,
    )
