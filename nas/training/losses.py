"""Dice + cross-entropy losses, MONAI's: BCE with one sigmoid output, CE with a softmax over
classes, and BCE + Dice per region channel for region-based training (a sigmoid per region).

Dice is computed over the whole batch ("batch Dice", as nnU-Net does), which keeps it stable
when most samples of a batch hold no foreground. Every loss `make_loss` returns is called as
`loss(logits, target)` with the sampler's class-index map (B, *spatial) as target, and with
a deeply supervised network's list of outputs (full resolution first) where it has several:
MONAI's `DeepSupervisionLoss` scores each against the target shrunk to its size by nearest
neighbour, with nnU-Net's weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai import losses
from torch import nn

from nas.data.labels import LabelScheme

SMOOTH = 1e-5  # added to the numerator and denominator of each Dice


class DiceCELoss(nn.Module):
    """Dice + CE over plain classes: logits (B, K, *spatial), K == 1 binary (a sigmoid, BCE),
    else a softmax with Dice over the foreground classes; target (B, 1, *spatial) class
    indices (any dtype)."""

    def __init__(self) -> None:
        super().__init__()
        common = {"batch": True, "smooth_nr": SMOOTH, "smooth_dr": SMOOTH}
        self.binary = losses.DiceCELoss(sigmoid=True, **common)
        self.classes = losses.DiceCELoss(
            softmax=True, to_onehot_y=True, include_background=False, **common
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[1] == 1:
            return self.binary(logits, (target > 0).float())
        return self.classes(logits, target.long())


class RegionDiceBCELoss(nn.Module):
    """BCE + batch Dice on each region's own sigmoid, as nnU-Net trains regions: a voxel is a
    target of every region holding its class, so nested regions overlap. logits (B, R,
    *spatial), one per region; target (B, 1, *spatial) class indices."""

    def __init__(self, scheme: LabelScheme) -> None:
        super().__init__()
        self.scheme = scheme
        self.dice = losses.DiceLoss(sigmoid=True, batch=True, smooth_nr=SMOOTH, smooth_dr=SMOOTH)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        targets = self.scheme.encode(target[:, 0].long()).float()  # (B, R, *spatial)
        return F.binary_cross_entropy_with_logits(logits, targets) + self.dice(logits, targets)


def deep_supervision_weights(n_outputs: int) -> tuple[float, ...]:
    """nnU-Net's weights for outputs at full, 1/2, 1/4, ... resolution: halving with each
    level, the lowest resolution's 0 (where there are several), normalised to sum 1."""
    weights = [0.5**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return tuple(w / total for w in weights)


class TrainingLoss(nn.Module):
    """`loss` on a class-index target (B, *spatial), on a network's one output or, deeply
    supervised, on each of its outputs with `deep_supervision_weights` (the one weighted 0
    is not scored at all)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.deep = losses.DeepSupervisionLoss(loss)

    def forward(
        self, outputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        target = target.unsqueeze(1).float()  # MONAI's (B, 1, *spatial), resizable
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = [w for w in deep_supervision_weights(len(outputs)) if w > 0]
        self.deep.weights = weights
        return self.deep(list(outputs[: len(weights)]), target)


def make_loss(scheme: LabelScheme) -> TrainingLoss:
    """The loss for what the network outputs, per region or over plain classes, on one
    output or several (deep supervision)."""
    return TrainingLoss(RegionDiceBCELoss(scheme) if scheme.regions else DiceCELoss())
