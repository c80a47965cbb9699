"""Segmentation metrics of one case, per class or region, in millimetres; and their summary.

For each region (a name and the label values whose union is its mask): Dice and IoU from
voxel counts; HD95, the larger of the two directed 95th percentiles of the distances between
the mask surfaces, and NSD, the fraction of both surfaces within `tolerance_mm` of the other,
both from MONAI (surfaces are the voxels that a 6-connected erosion removes; distances use
the voxel spacing); the volumes in millilitres and their absolute difference; and what
lesion studies (the ATLAS and ISLES stroke challenges) report (`lesion_metrics`): per-case
Dice, lesion-wise detection from connected components, and the lesion-count difference.

Empty masks, where MONAI returns NaN, follow Metrics Reloaded's advice so that means stay
finite and a miss scores as badly as it can:
- both empty (the region is absent and none was predicted): Dice, IoU and NSD 1, HD95 0;
- exactly one empty (a missed or an invented region): Dice, IoU and NSD 0, and HD95 the
  diagonal of the image's field of view in mm, longer than any distance inside the image.

Per-case Dice follows nnU-Net instead: a case where neither mask holds the region has no
Dice (NaN) and is left out of the mean over cases, so a dataset of small lesions is scored
case by case rather than by its few large ones (`case_dice_from_counts` gives the
search's `case_dice` objective).

Dice and IoU from voxel counts are defined here once (`dice_from_counts`, `iou_from_counts`)
for every caller: these metrics, validation's pooled scores and the postprocessing's per-case
Dice. Pure functions on arrays: no file reading, no command line.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from numpy.typing import ArrayLike

METRICS = (
    "dice",
    "iou",
    "hd95_mm",
    "nsd",
    "volume_pred_ml",
    "volume_ref_ml",
    "volume_diff_ml",
    "case_dice",
    "lesion_f1",
    "lesion_precision",
    "lesion_recall",
    "lesions_ref",
    "lesions_pred",
    "lesions_found",
    "false_lesions",
    "lesion_count_diff",
)
# Metrics a case may not have (NaN: neither mask holds a lesion to find or to score), left
# out of the mean over cases; their summary counts the cases that have them.
DEFINED_ONLY_SOMETIMES = ("case_dice", "lesion_f1", "lesion_precision", "lesion_recall")


def dice_from_counts(
    intersection: ArrayLike, predicted: ArrayLike, reference: ArrayLike
) -> np.ndarray:
    """Dice, 2 |P & R| / (|P| + |R|), from voxel counts (numbers or arrays of them, one per
    class); 1.0 where the prediction and the reference are both empty."""
    both = np.asarray(predicted) + np.asarray(reference)
    return np.where(both > 0, 2 * np.asarray(intersection) / np.maximum(both, 1), 1.0)


def iou_from_counts(
    intersection: ArrayLike, predicted: ArrayLike, reference: ArrayLike
) -> np.ndarray:
    """IoU (Jaccard), |P & R| / |P | R|, from voxel counts as `dice_from_counts` takes them;
    1.0 where both are empty."""
    union = np.asarray(predicted) + np.asarray(reference) - np.asarray(intersection)
    return np.where(union > 0, np.asarray(intersection) / np.maximum(union, 1), 1.0)


def case_dice_from_counts(case_counts: ArrayLike) -> np.ndarray:
    """The mean per-case Dice of per-case voxel counts (..., cases, 3, K): (intersection,
    predicted, truth) per class or region k, as validation keeps them; the leading axes (none,
    or epochs and bootstrap resamples) are kept, so one call scores every resample.

    Each case's Dice per class; a case whose truth and prediction both lack the class has
    none (nnU-Net: NaN) and is left out; per class the mean over the cases that have one, then
    the mean over the classes some case has. 1.0 where no case has any (nothing to find and
    nothing predicted), as pooled Dice scores a class absent everywhere.
    """
    counts = np.asarray(case_counts, dtype=float)
    intersection, predicted, truth = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    both = predicted + truth
    held = both > 0
    dice = np.where(held, 2 * intersection / np.where(held, both, 1.0), 0.0)
    n_cases = held.sum(axis=-2)  # (..., K)
    per_class = dice.sum(axis=-2) / np.maximum(n_cases, 1)
    n_classes = (n_cases > 0).sum(axis=-1)
    mean = np.where(n_cases > 0, per_class, 0.0).sum(axis=-1) / np.maximum(n_classes, 1)
    return np.where(n_classes > 0, mean, 1.0)


@dataclass(frozen=True)
class LesionMetrics:
    """What lesion studies report for one class (or region) of one case. Lesions are the
    connected components of a mask, 26-connected in 3D (8-connected in 2D): voxels sharing a
    face, an edge or a corner belong to one lesion, as the ATLAS and ISLES challenges count
    them. A reference lesion is found when any predicted voxel overlaps it; a predicted
    component that overlaps no reference lesion is a false lesion."""

    case_dice: float  # NaN where neither mask holds the class (left out of means, nnU-Net)
    lesions_ref: int  # reference lesions
    lesions_pred: int  # predicted components
    lesions_found: int  # true positives: reference lesions a predicted voxel overlaps
    false_lesions: int  # false positives: predicted components overlapping no reference lesion
    lesion_precision: float  # found / (found + false); NaN with no predicted component
    lesion_recall: float  # found / reference lesions; NaN with no reference lesion
    lesion_f1: float  # 2 found / (2 found + false + missed); NaN where neither holds a lesion
    lesion_count_diff: int  # |predicted components - reference lesions|
    volume_diff: float  # |predicted - reference| volume, in volume_unit
    volume_unit: str  # "ml" where the voxel spacing is known, else "voxels"

    @property
    def lesions_missed(self) -> int:
        """False negatives: reference lesions no predicted voxel overlaps."""
        return self.lesions_ref - self.lesions_found


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def mask_lesions(
    prediction: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float] | None = None
) -> LesionMetrics:
    """The lesion metrics of two boolean masks (2D or 3D) of one grid; the volume difference
    in ml with `spacing_mm` (the voxel size per axis), else in voxels."""
    from scipy import ndimage

    prediction, reference = np.asarray(prediction, bool), np.asarray(reference, bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ")
    ndim = reference.ndim
    # Labelling costs by the voxels it visits: only the box that holds both masks.
    box = _bounding_box(prediction | reference)
    prediction, reference = prediction[box], reference[box]
    full = ndimage.generate_binary_structure(ndim, ndim)  # 26-connected in 3D, 8 in 2D
    reference_lesions, n_ref = ndimage.label(reference, structure=full)
    predicted_lesions, n_pred = ndimage.label(prediction, structure=full)
    overlap = prediction & reference
    # The lesions the overlap touches, by component number (0, the background, dropped).
    found = int(np.count_nonzero(np.bincount(reference_lesions[overlap], minlength=n_ref + 1)[1:]))
    touching = np.bincount(predicted_lesions[overlap], minlength=n_pred + 1)[1:]
    false = n_pred - int(np.count_nonzero(touching))
    missed = n_ref - found
    n_both = int(np.count_nonzero(overlap))
    n_p, n_r = int(np.count_nonzero(prediction)), int(np.count_nonzero(reference))
    if spacing_mm is None:
        volume_diff, unit = float(abs(n_p - n_r)), "voxels"
    else:
        if len(spacing_mm) != ndim:
            raise ValueError(f"spacing {tuple(spacing_mm)} does not fit a {ndim}D mask")
        volume_diff, unit = abs(n_p - n_r) * math.prod(spacing_mm) / 1000.0, "ml"
    return LesionMetrics(
        case_dice=_ratio(2 * n_both, n_p + n_r),
        lesions_ref=n_ref,
        lesions_pred=n_pred,
        lesions_found=found,
        false_lesions=false,
        lesion_precision=_ratio(found, found + false),
        lesion_recall=_ratio(found, n_ref),
        lesion_f1=_ratio(2 * found, 2 * found + false + missed),
        lesion_count_diff=abs(n_pred - n_ref),
        volume_diff=volume_diff,
        volume_unit=unit,
    )


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of `mask` (empty slices where none is)."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        held = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(held[0]), int(held[-1]) + 1) if held.size else slice(0, 0))
    return tuple(box)


def _foreground_values(labels: np.ndarray) -> set[int]:
    """The nonzero values of a label map (counted rather than sorted where they are small)."""
    small = np.issubdtype(labels.dtype, np.integer) and labels.size > 0
    if small and labels.min() >= 0 and labels.max() < 65536:
        return {int(v) for v in np.flatnonzero(np.bincount(labels.ravel()))} - {0}
    return {int(v) for v in np.unique(labels)} - {0}


def lesion_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_mm: Sequence[float] | None = None,
    classes: Sequence[int] | None = None,
) -> dict[int, LesionMetrics]:
    """The lesion metrics (`mask_lesions`) of each foreground class of two label maps of one
    grid, by class value: `classes`, or every nonzero value either map holds; a binary map
    (boolean, or 0 and 1) is class 1, scored even where both are empty. Volumes in ml with
    `spacing_mm`, else in voxels."""
    maps = [np.asarray(a) for a in (prediction, reference)]
    prediction, reference = (a.view(np.uint8) if a.dtype == bool else a for a in maps)
    if classes is None:
        found = _foreground_values(prediction) | _foreground_values(reference)
        classes = sorted(found or {1})
    return {int(k): mask_lesions(prediction == k, reference == k, spacing_mm) for k in classes}


@dataclass(frozen=True)
class ClassMetrics:
    """The metrics of one region of one case; volumes in millilitres; the lesion-wise ones
    as `LesionMetrics` defines them."""

    case: str
    region: str
    dice: float
    iou: float
    hd95_mm: float
    nsd: float
    volume_pred_ml: float
    volume_ref_ml: float
    volume_diff_ml: float  # |volume_pred_ml - volume_ref_ml|
    case_dice: float  # NaN where both are empty (nnU-Net), else dice
    lesion_f1: float
    lesion_precision: float
    lesion_recall: float
    lesions_ref: int
    lesions_pred: int
    lesions_found: int
    false_lesions: int
    lesion_count_diff: int

    @classmethod
    def both_empty(cls, case: str, region: str) -> ClassMetrics:
        """The row of a region that neither the prediction nor the reference holds."""
        nan = math.nan
        return cls(
            case, region, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, nan, nan, nan, nan, 0, 0, 0, 0, 0
        )


def _surface_distances(
    prediction: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float
) -> tuple[float, float]:
    """HD95 (mm) and NSD of two non-empty boolean masks, by MONAI."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    y_pred = torch.from_numpy(prediction)[None, None]  # (B, C, *spatial), one-hot of one class
    y = torch.from_numpy(reference)[None, None]
    spacing = [float(s) for s in spacing_mm]
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated argument internally; not the caller's concern.
        warnings.filterwarnings(
            "ignore", message=".*always_return_as_numpy", category=FutureWarning
        )
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=spacing
        )
        nsd = compute_surface_dice(
            y_pred, y, [tolerance_mm], include_background=True, spacing=spacing
        )
    return float(hd95[0, 0]), float(nsd[0, 0])


def region_metrics(
    case: str,
    region: str,
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float = 1.0,
) -> ClassMetrics:
    """The metrics of one region given as two boolean masks of one grid."""
    voxel_ml = math.prod(spacing_mm) / 1000.0
    n_pred, n_ref = int(np.count_nonzero(prediction)), int(np.count_nonzero(reference))
    volume_pred, volume_ref = n_pred * voxel_ml, n_ref * voxel_ml
    if n_pred == 0 and n_ref == 0:
        return ClassMetrics.both_empty(case, region)
    if n_pred == 0 or n_ref == 0:
        diagonal = math.hypot(*(n * s for n, s in zip(prediction.shape, spacing_mm, strict=True)))
        hd95, nsd = diagonal, 0.0
    else:
        hd95, nsd = _surface_distances(prediction, reference, spacing_mm, tolerance_mm)
    n_both = int(np.count_nonzero(prediction & reference))
    lesions = mask_lesions(prediction, reference, spacing_mm)
    return ClassMetrics(
        case,
        region,
        dice=float(dice_from_counts(n_both, n_pred, n_ref)),
        iou=float(iou_from_counts(n_both, n_pred, n_ref)),
        hd95_mm=hd95,
        nsd=nsd,
        volume_pred_ml=volume_pred,
        volume_ref_ml=volume_ref,
        volume_diff_ml=abs(volume_pred - volume_ref),
        case_dice=lesions.case_dice,
        lesion_f1=lesions.lesion_f1,
        lesion_precision=lesions.lesion_precision,
        lesion_recall=lesions.lesion_recall,
        lesions_ref=lesions.lesions_ref,
        lesions_pred=lesions.lesions_pred,
        lesions_found=lesions.lesions_found,
        false_lesions=lesions.false_lesions,
        lesion_count_diff=lesions.lesion_count_diff,
    )


def case_metrics(
    case: str,
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_mm: Sequence[float],
    regions: dict[str, tuple[int, ...]],
    tolerance_mm: float = 1.0,
) -> list[ClassMetrics]:
    """The metrics of every region of one case, in the order of `regions`.

    prediction, reference: label volumes (2D or 3D) of one grid, holding label values.
    spacing_mm: the voxel size along each array axis.
    regions: region name -> the label values whose union is its mask (one value for a
        plain class, several for an nnU-Net region such as a whole tumour).
    tolerance_mm: the distance within which a surface voxel counts as correct for NSD.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} differ")
    if len(spacing_mm) != prediction.ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not fit shape {prediction.shape}")
    return [
        region_metrics(
            case,
            region,
            np.isin(prediction, values),
            np.isin(reference, values),
            spacing_mm,
            tolerance_mm,
        )
        for region, values in regions.items()
    ]


def as_table(rows: Iterable[ClassMetrics]) -> pd.DataFrame:
    """One row per case and region, with the columns of ClassMetrics."""
    import pandas as pd

    return pd.DataFrame(
        [dataclasses.asdict(row) for row in rows],
        columns=[field.name for field in dataclasses.fields(ClassMetrics)],
    )


def _finite(value: float) -> float | None:
    """A statistic for JSON: None where it is undefined (NaN)."""
    return None if math.isnan(value) else value


def summarize(table: pd.DataFrame) -> dict:
    """Per region, in order of first appearance: the number of cases `n` and the mean,
    median and sample standard deviation of each metric (sd None for a single case); the
    metrics a case may lack (`DEFINED_ONLY_SOMETIMES`) over the cases that have them, with
    their count `n` (statistics None where none has). And `lesions_pooled`: the lesions
    found, missed and false over all cases, and the F1 of those sums."""
    summary = {}
    for region, rows in table.groupby("region", sort=False):
        stats: dict = {"n": len(rows)}
        for metric in METRICS:
            values = rows[metric].astype(float).dropna()
            stats[metric] = {
                "mean": _finite(float(values.mean())),
                "median": _finite(float(values.median())),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            }
            if metric in DEFINED_ONLY_SOMETIMES:
                stats[metric]["n"] = len(values)
        found, false = int(rows.lesions_found.sum()), int(rows.false_lesions.sum())
        missed = int(rows.lesions_ref.sum()) - found
        stats["lesions_pooled"] = {
            "found": found,
            "missed": missed,
            "false": false,
            "f1": _finite(_ratio(2 * found, 2 * found + false + missed)),
        }
        summary[str(region)] = stats
    return summary
