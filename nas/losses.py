"""Dice + cross-entropy losses: BCE with one sigmoid output, CE with a softmax over classes,
and BCE + Dice per region channel for region-based training (a sigmoid per region).

Dice is computed over the whole batch ("batch Dice", as nnU-Net does), which keeps it stable
when most samples of a batch hold no foreground. Every loss is called as
`loss(logits, target)` with the sampler's class-index map as target; `DeepSupervisionLoss`
applies any of them to each output of a deeply supervised network, as nnU-Net weighs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nas.labels import LabelScheme


def _batch_dice(probs: torch.Tensor, targets: torch.Tensor, smooth: float) -> torch.Tensor:
    """Mean over channels of the Dice of (B, C, *spatial) probabilities, pooled over the batch."""
    axes = (0, *range(2, probs.dim()))
    intersection = (probs * targets).sum(axes)
    total = probs.sum(axes) + targets.sum(axes)
    return ((2 * intersection + smooth) / (total + smooth)).mean()


class DiceCELoss(nn.Module):
    def __init__(self, smooth: float = 1e-5) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, K, *spatial); target (B, *spatial) class indices. K == 1 is binary."""
        logits = logits.float()
        if logits.shape[1] == 1:
            target_onehot = target.unsqueeze(1).float()
            ce = F.binary_cross_entropy_with_logits(logits, target_onehot)
            probs = torch.sigmoid(logits)
        else:
            ce = F.cross_entropy(logits, target)
            probs = torch.softmax(logits, 1)[:, 1:]
            target_onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
        return ce + (1 - _batch_dice(probs, target_onehot, self.smooth))


class RegionDiceBCELoss(nn.Module):
    """BCE + batch Dice on each region's own sigmoid, as nnU-Net trains regions: a voxel is a
    target of every region holding its class, so nested regions overlap."""

    def __init__(self, scheme: LabelScheme, smooth: float = 1e-5) -> None:
        super().__init__()
        self.scheme = scheme
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, R, *spatial), one per region; target (B, *spatial) class indices."""
        logits = logits.float()
        targets = self.scheme.encode(target)  # (B, R, *spatial)
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        return bce + (1 - _batch_dice(torch.sigmoid(logits), targets, self.smooth))


def make_loss(scheme: LabelScheme) -> nn.Module:
    """The loss for what the network outputs: per region, or over plain classes."""
    return RegionDiceBCELoss(scheme) if scheme.regions else DiceCELoss()


def deep_supervision_weights(n_outputs: int) -> tuple[float, ...]:
    """nnU-Net's weights for outputs at full, 1/2, 1/4, ... resolution: halving with each
    level, the lowest resolution's 0 (where there are several), normalised to sum 1."""
    weights = [0.5**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return tuple(w / total for w in weights)


def downsample_target(target: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """`target` (B, *spatial) or (B, C, *spatial) resized to `spatial` by nearest neighbour,
    which keeps class indices (and binary masks) as they are. Where a stage downsamples by s,
    its voxel i reads target voxel s * i: the centre of the strided convolution that made it."""
    if tuple(target.shape[-len(spatial) :]) == tuple(spatial):
        return target
    has_channels = target.dim() == len(spatial) + 2
    resized = F.interpolate(
        (target if has_channels else target.unsqueeze(1)).float(), size=tuple(spatial)
    ).to(target.dtype)
    return resized if has_channels else resized.squeeze(1)


class DeepSupervisionLoss(nn.Module):
    """`loss(logits, target)` on each output of a deeply supervised network (full resolution
    first) against the target downsampled to that output's size, weighted by
    `deep_supervision_weights`. A single tensor is scored as the only output."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(
        self, outputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        weights = deep_supervision_weights(len(outputs))
        terms = [
            weight * self.loss(logits, downsample_target(target, logits.shape[2:]))
            for weight, logits in zip(weights, outputs, strict=True)
            if weight > 0  # nnU-Net's lowest output: not scored at all
        ]
        return sum(terms[1:], terms[0])
