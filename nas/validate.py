"""Validation on whole cases: predict every voxel, then pool IoU and Dice over the cases.

2D networks predict each slice along the slice axis, 3D networks the volume; both through
MONAI's sliding-window inference with the training patch size and Gaussian blending, so the
network sees at test time the field of view it was trained on (as nnU-Net does). Predictions
become class maps as the dataset's `LabelScheme` says (regions written in order), and are
scored per foreground class or, for a region-based dataset, per region (as nnU-Net scores
regions: on the class maps); counts are pooled over all validation cases before the ratio is
taken, and the objective is the mean over classes or regions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from nas.data import Case
from nas.labels import LabelScheme
from nas.metrics import dice_from_counts, iou_from_counts

# Of a sliding window, the share its neighbours overlap: validation always, predict by default.
DEFAULT_OVERLAP = 0.25


@dataclass(frozen=True)
class Scores:
    iou: float  # foreground Jaccard, mean over classes (or regions)
    dice: float
    iou_per_class: tuple[float, ...]  # one per class, or per region of a region-based dataset


# What an epoch scores when nothing is held out for validation (nas retrain --all-cases).
NO_VALIDATION = Scores(float("nan"), float("nan"), ())


@torch.no_grad()
def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int = 2,
    windows_per_batch: int = 16,
    overlap: float = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """Logits (K, X, Y, Z) on `device` for one preprocessed image (C, X, Y, Z); what `model`
    returns per window, so probabilities for a nas.inference.Predictor.

    patch_size: in-plane size for a 2D network (which sees slices along `slice_axis`),
    (X, Y, Z) for a 3D one. overlap: the share of a window its neighbours cover, in [0, 1).
    """
    # A copy: cached arrays are read-only memory maps.
    inputs = torch.from_numpy(np.array(image, dtype=np.float32)).to(device)
    two_d = len(patch_size) == 2
    # 2D: the slices are the batch, (S, C, a, b); 3D: one volume, (1, C, X, Y, Z).
    inputs = inputs.movedim(slice_axis + 1, 0) if two_d else inputs.unsqueeze(0)
    logits = sliding_window_inference(
        inputs, tuple(patch_size), windows_per_batch, model, overlap=overlap, mode="gaussian"
    )
    return logits.movedim(0, slice_axis + 1) if two_d else logits[0]


def predict_case(
    model: nn.Module,
    case: Case,
    scheme: LabelScheme,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int = 2,
) -> np.ndarray:
    """Class-index map (X, Y, Z) for one preprocessed case."""
    logits = predict_logits(model, case.image, patch_size, device, slice_axis)
    return scheme.classes_from_logits(logits).cpu().numpy()


def evaluate(
    model: nn.Module,
    cases: Sequence[Case],
    scheme: LabelScheme,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int = 2,
) -> Scores:
    was_training = model.training
    model.eval()
    counts = PooledCounts(scheme)
    for case in cases:
        counts.add(predict_case(model, case, scheme, patch_size, device, slice_axis), case.label)
    model.train(was_training)
    return counts.scores()


class PooledCounts:
    """Voxel counts per foreground class (or region), pooled over cases before any ratio is
    taken."""

    def __init__(self, scheme: LabelScheme) -> None:
        self.covers = scheme.covers  # the classes of each scored class or region
        n = len(self.covers)
        self.intersection, self.predicted, self.truth = (np.zeros(n) for _ in range(3))

    def add(self, prediction: np.ndarray, label: np.ndarray) -> None:
        """One case's class-index maps (0 = background)."""
        label = np.asarray(label)
        for k, classes in enumerate(self.covers):
            p, t = _any_of(prediction, classes), _any_of(label, classes)
            self.intersection[k] += np.logical_and(p, t).sum()
            self.predicted[k] += p.sum()
            self.truth[k] += t.sum()

    def scores(self) -> Scores:
        counts = self.intersection, self.predicted, self.truth
        # A class absent from both prediction and truth everywhere is perfectly segmented
        # (split_dataset keeps every class in validation, so a search never scores this way).
        iou, dice = iou_from_counts(*counts), dice_from_counts(*counts)
        return Scores(float(iou.mean()), float(dice.mean()), tuple(float(v) for v in iou))


def _any_of(classes: np.ndarray, members: Sequence[int]) -> np.ndarray:
    """Where a class map holds any of `members` (bool masks only: volumes can be large)."""
    mask = classes == members[0]
    for k in members[1:]:
        mask |= classes == k
    return mask
