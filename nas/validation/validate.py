"""Validation: on a fixed set of patches while a search decides, on whole cases at the end.

A search's decisions (rungs, "still learning", the endgame) read validation after the epochs
they use, on `ValidationPatches`: a fixed, seeded set of patches per validation case, half of
them centred on foreground (as nnU-Net's online validation samples them), so what a decision
costs is bounded by the patch count whatever the volumes' size. Counts are kept per case, so
a score's noise over cases can be bootstrapped (nas/search/scoring.py).

Whole cases are predicted for the front's final scores, cross-validation and held-out tests
window by window (nas/network/windows.py). Predictions become class maps as the dataset's
`LabelScheme` says (regions written in order), and are scored per foreground class or, for a
region-based dataset, per region (as nnU-Net scores regions: on the class maps); counts are
pooled over all validation cases before the ratio is taken, and the objective is the mean
over classes or regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nas.data import Case, patch_at, validation_centres
from nas.data.labels import LabelScheme
from nas.network.precision import autocast
from nas.network.windows import predict_case
from nas.validation.metrics import case_dice_from_counts, dice_from_counts, iou_from_counts


@dataclass(frozen=True)
class Scores:
    iou: float  # foreground Jaccard, mean over classes (or regions)
    dice: float
    iou_per_class: tuple[float, ...]  # one per class, or per region of a region-based dataset
    # Voxel counts per validation case: (intersection, predicted, truth) per class or region,
    # for bootstrap intervals over cases; empty where not kept.
    case_counts: tuple[tuple[tuple[float, ...], ...], ...] = ()
    # Dice per case, averaged over the cases (nas.validation.metrics.case_dice_from_counts);
    # NaN where no per-case counts were kept.
    case_dice: float = float("nan")

    def value(self, metric: str) -> float:
        """The score a learning curve holds (`objectives.curve_metric`): iou or case_dice."""
        return {"iou": self.iou, "case_dice": self.case_dice}[metric]


# What an epoch scores when nothing is held out for validation (nas retrain --all-cases).
NO_VALIDATION = Scores(float("nan"), float("nan"), ())


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


class ValidationPatches:
    """The fixed validation patches of a search: per validation case, patches centred on the
    same seeded voxels for every candidate (`nas.data.validation_centres`), cut at each
    candidate's own patch size (cut once per size and kept)."""

    def __init__(
        self,
        cases: Sequence[Case],
        per_case: int,
        seed: int,
        slice_axis: int = 2,
        foreground_fraction: float = 0.5,
    ) -> None:
        self.cases = list(cases)
        self.slice_axis = slice_axis
        self.centres = validation_centres(self.cases, per_case, foreground_fraction, seed)
        self._cut: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return sum(len(c) for c in self.centres)

    def cut(self, patch_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """images (N, C, *patch) float32, labels (N, *patch), and each patch's case index."""
        key = tuple(patch_size)
        if key not in self._cut:
            pairs, owners = [], []
            for index, (case, centres) in enumerate(zip(self.cases, self.centres, strict=True)):
                pairs += [patch_at(case, c, key, self.slice_axis) for c in centres]
                owners += [index] * len(centres)
            images = np.stack([image for image, _ in pairs])
            labels = np.stack([label for _, label in pairs])
            self._cut[key] = images, labels, np.array(owners, dtype=np.int64)
        return self._cut[key]


@torch.no_grad()
def evaluate_patches(
    model: nn.Module,
    patches: ValidationPatches,
    scheme: LabelScheme,
    patch_size: Sequence[int],
    device: torch.device,
    batch_size: int = 16,
) -> Scores:
    """Scores on the fixed validation patches, counts pooled per case then over cases: what
    a search decides on, at a cost set by the patch count alone."""
    images, labels, owners = patches.cut(patch_size)
    was_training = model.training
    model.eval()
    counts = PooledCounts(scheme)
    per_case = np.zeros((len(patches.cases), 3, len(scheme.covers)))
    for first in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[first : first + batch_size]).to(device)
        with autocast(device):
            logits_batch = model(batch).float()
        for offset, logits in enumerate(logits_batch):
            index = first + offset
            classes = scheme.classes_from_logits(logits).cpu().numpy()
            per_case[owners[index]] += counts.counts(classes, labels[index])
    model.train(was_training)
    counts.cases = list(per_case)
    return counts.scores()


class PooledCounts:
    """Voxel counts per foreground class (or region), pooled over cases before any ratio is
    taken; each case's own counts are kept too (`Scores.case_counts`)."""

    def __init__(self, scheme: LabelScheme) -> None:
        self.covers = scheme.covers  # the classes of each scored class or region
        self.cases: list[np.ndarray] = []  # (3, K) per case: intersection, predicted, truth

    def add(self, prediction: np.ndarray, label: np.ndarray) -> None:
        """One case's class-index maps (0 = background)."""
        self.cases.append(self.counts(prediction, label))

    def counts(self, prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
        """(intersection, predicted, truth) per class or region of one pair of class maps."""
        label = np.asarray(label)
        out = np.zeros((3, len(self.covers)))
        for k, classes in enumerate(self.covers):
            p, t = _any_of(prediction, classes), _any_of(label, classes)
            out[:, k] = np.logical_and(p, t).sum(), p.sum(), t.sum()
        return out

    def scores(self) -> Scores:
        per_case = np.array(self.cases).reshape(-1, 3, len(self.covers))
        kept = tuple(tuple(tuple(float(v) for v in row) for row in case) for case in per_case)
        case_dice = float(case_dice_from_counts(per_case))
        return Scores(*pooled_scores(per_case), case_counts=kept, case_dice=case_dice)


def pooled_scores(case_counts: np.ndarray) -> tuple[float, float, tuple[float, ...]]:
    """IoU and Dice (means over classes) and IoU per class of counts (cases, 3, K), pooled
    over the cases before the ratio is taken."""
    intersection, predicted, truth = np.asarray(case_counts).sum(axis=0)
    # A class absent from both prediction and truth everywhere is perfectly segmented
    # (split_dataset keeps every class in validation, so a search never scores this way).
    iou = iou_from_counts(intersection, predicted, truth)
    dice = dice_from_counts(intersection, predicted, truth)
    return float(iou.mean()), float(dice.mean()), tuple(float(v) for v in iou)


def _any_of(classes: np.ndarray, members: Sequence[int]) -> np.ndarray:
    """Where a class map holds any of `members` (bool masks only: volumes can be large)."""
    mask = classes == members[0]
    for k in members[1:]:
        mask |= classes == k
    return mask
