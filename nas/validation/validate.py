"""Validation: on a fixed set of patches while a search decides, on whole cases at the end.

A search's decisions (rungs, "still learning", the endgame) read validation after the epochs
they use, on `ValidationPatches`: a fixed, seeded set of patches per validation case, half of
them centred on foreground (as nnU-Net's online validation samples them), so what a decision
costs is bounded by the patch count whatever the volumes' size. Counts are kept per case, so
a score's noise over cases can be bootstrapped (nas/search/scoring.py).

Whole cases are predicted for the front's final scores, cross-validation and held-out tests:
2D networks predict each slice along the slice axis, 3D networks the volume; both through
MONAI's sliding-window inference with the training patch size and Gaussian blending, so the
network sees at test time the field of view it was trained on (as nnU-Net does). The volume
stays on the device, windows go through the network several at a time
(`windows_per_batch`; a 2D network's from several slices at once), under mixed precision on
CUDA, and a prediction that takes a while shows a progress bar on a terminal. Predictions
become class maps as the dataset's `LabelScheme` says (regions written in order), and are
scored per foreground class or, for a region-based dataset, per region (as nnU-Net scores
regions: on the class maps); counts are pooled over all validation cases before the ratio is
taken, and the objective is the mean over classes or regions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn
from tqdm import tqdm

from nas.data import Case, patch_at, validation_centres
from nas.data.labels import LabelScheme
from nas.network.precision import autocast
from nas.validation.metrics import case_dice_from_counts, dice_from_counts, iou_from_counts

# Of a sliding window, the share its neighbours overlap: validation always, predict by default.
DEFAULT_OVERLAP = 0.25
# Windows per forward pass of a whole-case prediction (nas.predict takes 8), but for 3D
# windows on a CPU (`windows_per_batch`).
WINDOWS_PER_BATCH = 16
# On a CPU, 3D windows go through 4 at a time: a batch's activations then stay in the cache.
# On 2 cores, a 32^3 window took 12-24 ms in batches of 2 to 4 and 21-40 ms in batches of 16
# (two 3D U-Nets of 37k and 369k parameters); 2D windows cost the same from 4 to 32.
CPU_3D_WINDOWS_PER_BATCH = 4


def windows_per_batch(spatial_dims: int, device: torch.device) -> int:
    """Windows per forward pass of a whole-case prediction on `device`."""
    if device.type == "cpu" and spatial_dims == 3:
        return CPU_3D_WINDOWS_PER_BATCH
    return WINDOWS_PER_BATCH


def windows_that_fit(wanted: int, window_bytes: int, device: torch.device) -> int:
    """Windows per forward pass: `wanted`, fewer where that many windows of `window_bytes`
    each (nas.network.memory.estimate_inference_bytes) would not fit in what `device` has available;
    at least one (a model whose one window does not fit is refused when its card is read)."""
    from nas.core.resources import available_host_bytes, default_memory_limit_bytes

    if device.type == "cpu":
        available = available_host_bytes()
    else:
        available = default_memory_limit_bytes(device)
    return max(1, min(wanted, available // max(window_bytes, 1)))


# A prediction shows its progress bar once it has taken this long (on a terminal only).
PROGRESS_AFTER_S = 2.0


@dataclass(frozen=True)
class Scores:
    iou: float  # foreground Jaccard, mean over classes (or regions)
    dice: float
    iou_per_class: tuple[float, ...]  # one per class, or per region of a region-based dataset
    # Voxel counts per validation case: (intersection, predicted, truth) per class or region,
    # for bootstrap intervals over cases; empty where not kept.
    case_counts: tuple[tuple[tuple[float, ...], ...], ...] = ()
    # Dice per case, averaged over the cases (nas.validation.metrics.case_dice_from_counts); NaN
    # where
    # no per-case counts were kept.
    case_dice: float = float("nan")

    def value(self, metric: str) -> float:
        """The score a learning curve holds (`objectives.curve_metric`): iou or case_dice."""
        return {"iou": self.iou, "case_dice": self.case_dice}[metric]


# What an epoch scores when nothing is held out for validation (nas retrain --all-cases).
NO_VALIDATION = Scores(float("nan"), float("nan"), ())


def window_count(
    shape: Sequence[int],
    patch_size: Sequence[int],
    slice_axis: int = 2,
    overlap: float = DEFAULT_OVERLAP,
) -> int:
    """How many windows `predict_logits` runs over a volume of `shape` (X, Y, Z): for a 2D
    `patch_size`, those of every slice along `slice_axis`."""
    if len(patch_size) == 2:
        plane = [n for axis, n in enumerate(shape) if axis != slice_axis]
        return shape[slice_axis] * _windows(plane, patch_size, overlap)
    return _windows(shape, patch_size, overlap)


def _windows(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> int:
    """Windows of MONAI's sliding-window inference over one image of `shape`."""
    size = [max(n, p) for n, p in zip(shape, patch_size, strict=True)]  # padded up to a window
    # MONAI's scan interval: a window's length less the overlap, or the whole axis.
    interval = [
        p if p == n else max(int(p * (1 - overlap)), 1)
        for n, p in zip(size, patch_size, strict=True)
    ]
    return len(dense_patch_slices(size, patch_size, interval))


@torch.no_grad()
def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    patch_size: Sequence[int],
    device: torch.device,
    slice_axis: int = 2,
    batch: int | None = None,
    overlap: float = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """Logits (K, X, Y, Z) on `device` for one preprocessed image (C, X, Y, Z); what `model`
    returns per window, so probabilities for a nas.network.inference.Predictor.

    patch_size: in-plane size for a 2D network (which sees slices along `slice_axis`),
    (X, Y, Z) for a 3D one. overlap: the share of a window its neighbours cover, in [0, 1).
    batch: windows per call of `model` (None: `windows_per_batch`); for a 2D network, from
    several slices.
    """
    # A copy: cached arrays are read-only memory maps.
    inputs = torch.from_numpy(np.array(image, dtype=np.float32)).to(device)
    two_d = len(patch_size) == 2
    batch = batch or windows_per_batch(len(patch_size), device)
    # 2D: the slices are the batch, (S, C, a, b), and MONAI batches windows across them;
    # 3D: one volume, (1, C, X, Y, Z).
    inputs = inputs.movedim(slice_axis + 1, 0) if two_d else inputs.unsqueeze(0)
    total = window_count(image.shape[1:], patch_size, slice_axis, overlap)
    # disable=None: on a terminal only, not in logs or captured output.
    progress = tqdm(total=total, desc="sliding windows", unit="window", leave=False,
                    delay=PROGRESS_AFTER_S, disable=None)  # fmt: skip

    def counted(windows: torch.Tensor) -> torch.Tensor:
        logits = model(windows)
        progress.update(len(windows))
        return logits

    with contextlib.closing(progress), autocast(device):
        logits = sliding_window_inference(
            inputs, tuple(patch_size), batch, counted, overlap=overlap, mode="gaussian"
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
