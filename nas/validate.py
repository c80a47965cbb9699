"""Validation on whole cases: predict every voxel, then pool IoU and Dice over the cases.

2D networks predict each slice along the slice axis, 3D networks the volume; both through
MONAI's sliding-window inference with the training patch size and Gaussian blending, so the
network sees at test time the field of view it was trained on (as nnU-Net does). Counts are
pooled over all validation cases before the ratio is taken, per foreground class; the
objective is the mean over classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from nas.data import Case


@dataclass(frozen=True)
class Scores:
    iou: float  # foreground Jaccard, mean over classes
    dice: float
    iou_per_class: tuple[float, ...]


@torch.no_grad()
def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int = 2,
    windows_per_batch: int = 16,
) -> torch.Tensor:
    """Logits (K, X, Y, Z) on `device` for one preprocessed image (C, X, Y, Z); what `model`
    returns per window, so probabilities for a nas.inference.Predictor.

    patch_size: in-plane size for a 2D network (which sees slices along `slice_axis`),
    (X, Y, Z) for a 3D one.
    """
    # A copy: cached arrays are read-only memory maps.
    inputs = torch.from_numpy(np.array(image, dtype=np.float32)).to(device)
    two_d = len(patch_size) == 2
    # 2D: the slices are the batch, (S, C, a, b); 3D: one volume, (1, C, X, Y, Z).
    inputs = inputs.movedim(slice_axis + 1, 0) if two_d else inputs.unsqueeze(0)
    logits = sliding_window_inference(
        inputs, tuple(patch_size), windows_per_batch, model, overlap=0.25, mode="gaussian"
    )
    return logits.movedim(0, slice_axis + 1) if two_d else logits[0]


def labels_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Class indices (uint8) from logits (K, ...): sigmoid > 0.5 for one output, else argmax."""
    if logits.shape[0] == 1:
        return (logits[0] > 0).to(torch.uint8)  # sigmoid(x) > 0.5 <=> x > 0
    return logits.argmax(0).to(torch.uint8)


def predict_case(
    model: nn.Module,
    case: Case,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int = 2,
) -> np.ndarray:
    """Class-index map (X, Y, Z) for one preprocessed case."""
    logits = predict_logits(model, case.image, patch_size, device, slice_axis)
    return labels_from_logits(logits).cpu().numpy()


def evaluate(
    model: nn.Module,
    cases: Sequence[Case],
    n_classes: int,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int = 2,
) -> Scores:
    was_training = model.training
    model.eval()
    counts = PooledCounts(n_classes)
    for case in cases:
        counts.add(predict_case(model, case, patch_size, device, slice_axis), case.label)
    model.train(was_training)
    return counts.scores()


class PooledCounts:
    """Voxel counts per foreground class, pooled over cases before any ratio is taken."""

    def __init__(self, n_classes: int) -> None:
        self.intersection, self.predicted, self.truth = (np.zeros(n_classes) for _ in range(3))

    def add(self, prediction: np.ndarray, label: np.ndarray) -> None:
        """One case's class-index maps (0 = background)."""
        label = np.asarray(label)
        for k in range(len(self.truth)):
            p, t = prediction == k + 1, label == k + 1
            self.intersection[k] += np.logical_and(p, t).sum()
            self.predicted[k] += p.sum()
            self.truth[k] += t.sum()

    def scores(self) -> Scores:
        inter, both = self.intersection, self.predicted + self.truth
        union = both - inter
        # A class absent from both prediction and truth everywhere is perfectly segmented
        # (split_dataset keeps every class in validation, so a search never scores this way).
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        dice = np.where(both > 0, 2 * inter / np.maximum(both, 1), 1.0)
        return Scores(float(iou.mean()), float(dice.mean()), tuple(float(v) for v in iou))
