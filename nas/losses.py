"""Dice + cross-entropy loss: BCE with one sigmoid output, CE with a softmax over classes.

Dice is computed over the whole batch ("batch Dice", as nnU-Net does), which keeps it stable
when most samples of a batch hold no foreground.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiceCELoss(nn.Module):
    def __init__(self, smooth: float = 1e-5) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, K, *spatial); target (B, *spatial) class indices. K == 1 is binary."""
        logits = logits.float()
        spatial_axes = (0, *range(2, logits.dim()))
        if logits.shape[1] == 1:
            target_onehot = target.unsqueeze(1).float()
            ce = F.binary_cross_entropy_with_logits(logits, target_onehot)
            probs = torch.sigmoid(logits)
        else:
            ce = F.cross_entropy(logits, target)
            probs = torch.softmax(logits, 1)[:, 1:]
            target_onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].float()
        intersection = (probs * target_onehot).sum(spatial_axes)
        total = probs.sum(spatial_axes) + target_onehot.sum(spatial_axes)
        dice = (2 * intersection + self.smooth) / (total + self.smooth)
        return ce + (1 - dice.mean())
