"""Segmentation metrics of one case, per class or region, in millimetres; and their summary.

For each region (a name and the label values whose union is its mask): Dice and IoU from
voxel counts; HD95, the larger of the two directed 95th percentiles of the distances between
the mask surfaces, and NSD, the fraction of both surfaces within `tolerance_mm` of the other,
both from MONAI (surfaces are the voxels that a 6-connected erosion removes; distances use
the voxel spacing); the volumes in millilitres and their absolute difference.

Empty masks, where MONAI returns NaN, follow Metrics Reloaded's advice so that means stay
finite and a miss scores as badly as it can:
- both empty (the region is absent and none was predicted): Dice, IoU and NSD 1, HD95 0;
- exactly one empty (a missed or an invented region): Dice, IoU and NSD 0, and HD95 the
  diagonal of the image's field of view in mm, longer than any distance inside the image.

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
)


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


@dataclass(frozen=True)
class ClassMetrics:
    """The metrics of one region of one case; volumes in millilitres."""

    case: str
    region: str
    dice: float
    iou: float
    hd95_mm: float
    nsd: float
    volume_pred_ml: float
    volume_ref_ml: float
    volume_diff_ml: float  # |volume_pred_ml - volume_ref_ml|

    @classmethod
    def both_empty(cls, case: str, region: str) -> ClassMetrics:
        """The row of a region that neither the prediction nor the reference holds."""
        return cls(case, region, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0)


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


def summarize(table: pd.DataFrame) -> dict:
    """Per region, in order of first appearance: the number of cases `n` and the mean,
    median and sample standard deviation of each metric (sd None for a single case)."""
    summary = {}
    for region, rows in table.groupby("region", sort=False):
        stats: dict = {"n": len(rows)}
        for metric in METRICS:
            values = rows[metric].astype(float)
            stats[metric] = {
                "mean": float(values.mean()),
                "median": float(values.median()),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
            }
        summary[str(region)] = stats
    return summary
