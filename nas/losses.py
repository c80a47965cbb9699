"""Dice + cross-entropy losses: BCE with one sigmoid output, CE with a softmax over classes,
and BCE + Dice per region channel for region-based training (a sigmoid per region).

Dice is computed over the whole batch ("batch Dice", as nnU-Net does), which keeps it stable
when most samples of a batch hold no foreground. Every loss is called as
`loss(logits, target)` with the sampler's class-index map as target.
"""

from __future__ import annotations

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
