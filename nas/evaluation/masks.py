"""Predicted masks scored against reference labels, case by case and region by region.

Each label needs its prediction (matched by case name), on the label's voxel grid, holding only
the label values the regions declare (nnU-Net v2 dataset.json `labels`, or each nonzero value
found). nas.validation.metrics gives the metrics; here the files are paired, checked and read,
and metrics.csv and summary.json written. Knows nothing of the command line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.staging import atomic_write

if TYPE_CHECKING:
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from nas.validation.metrics import ClassMetrics

# The tolerances nas.data.preprocess uses for "the same grid".
AFFINE_RTOL, AFFINE_ATOL = 1e-4, 1e-3


@dataclass(frozen=True)
class Pair:
    case: str
    prediction: Path
    label: Path


def find_pairs(predictions: Path, labels: Path) -> tuple[list[Pair], list[Path]]:
    """Each label with its prediction, and the predictions that have no label."""
    from nas.data.layouts import nifti_files, nifti_stem

    for path in (predictions, labels):
        if not path.exists():
            raise NasError(path, "not found")
    if labels.is_file() or predictions.is_file():
        for path in (predictions, labels):
            if not path.is_file():
                raise NasError(
                    path, "is a folder; give PREDICTIONS and LABELS as two files or two folders"
                )
            if nifti_stem(path.name) is None:
                raise NasError(path, "not a NIfTI file (.nii or .nii.gz)")
        return [Pair(nifti_stem(labels.name), predictions, labels)], []
    label_files, prediction_files = nifti_files(labels), nifti_files(predictions)
    if not label_files:
        raise NasError(labels, "holds no .nii or .nii.gz file")
    missing = [case for case in label_files if case not in prediction_files]
    if missing:
        label = label_files[missing[0]]
        expected = predictions / f"{missing[0]}{label.name[len(missing[0]) :]}"
        others = f"; {len(missing) - 1} more labels have none" if len(missing) > 1 else ""
        raise NasError(expected, f"not found: the prediction for {label}{others}")
    pairs = [Pair(case, prediction_files[case], label) for case, label in label_files.items()]
    extra = [path for case, path in prediction_files.items() if case not in label_files]
    return pairs, extra


def read_regions(path: Path) -> dict[str, tuple[int, ...]]:
    """The foreground regions that a dataset.json declares: name -> label values.

    nnU-Net v2 `labels` map a name to a value or, for a region, to a list of values; MSD
    `labels` map a value to a name. Background (value 0) is not a region.
    """
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise NasError(path, "not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NasError(path, f"cannot be read as JSON ({err})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise NasError(path, "needs a 'labels' object (name -> label value)")
    if all(isinstance(name, str) for name in labels.values()) and all(
        key.isdigit() for key in labels
    ):  # MSD: value -> name
        labels = {name: int(value) for value, name in labels.items()}
    regions = {}
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            raise NasError(path, f"label {name!r} must be a non-negative integer or a list of them")
        if values == [0]:
            continue
        if 0 in values:
            raise NasError(path, f"region {name!r} includes background (0)")
        regions[str(name)] = tuple(values)
    if not regions:
        raise NasError(path, "declares no label besides background (0)")
    return regions


def _spatial_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A shape without the trailing axes of length 1 beyond the third (a time axis of 1)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _open(path: Path) -> nib.spatialimages.SpatialImage:
    from nas.data.preprocess import open_nifti

    return open_nifti(path)


def check_grid(pair: Pair) -> tuple[float, ...]:
    """The voxel spacing in mm of a label whose prediction lies on its grid; reads headers only."""
    import numpy as np

    prediction, label = _open(pair.prediction), _open(pair.label)
    shape = _spatial_shape(label.shape)
    if len(shape) not in (2, 3):
        raise NasError(pair.label, f"expected a 2D or 3D mask, found shape {label.shape}")
    if _spatial_shape(prediction.shape) != shape:
        raise NasError(
            pair.prediction,
            f"shape {prediction.shape} differs from {label.shape} of the label {pair.label}",
        )
    if not np.allclose(prediction.affine, label.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        difference = float(np.abs(prediction.affine - label.affine).max())
        raise NasError(
            pair.prediction,
            f"affine differs from that of the label {pair.label} (by up to {difference:.3g}); "
            "the prediction must lie on the label's voxel grid",
        )
    spacing = tuple(float(z) for z in label.header.get_zooms()[: len(shape)])
    if not all(0 < s < math.inf for s in spacing):
        raise NasError(pair.label, f"voxel spacing {spacing} must be positive and finite")
    return spacing


def read_mask(path: Path) -> np.ndarray:
    """The label values of a mask file, as stored (floats that hold integers become int32)."""
    import numpy as np

    try:
        data = np.asanyarray(_open(path).dataobj)
    except Exception as err:  # truncated or corrupt compressed data shows up here
        raise NasError(path, f"cannot be read as NIfTI ({err})") from None
    data = data.reshape(_spatial_shape(data.shape))
    if np.issubdtype(data.dtype, np.floating):
        fractional = ~np.isfinite(data) | (data != np.round(data))
        if fractional.any():
            raise NasError(
                path, f"holds {data[fractional].flat[0]}, not a label value; expected integers"
            )
        data = data.astype(np.int32)
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        raise NasError(path, f"holds {data.dtype} voxels; expected integer label values")
    return data


def label_values(path: Path, mask: np.ndarray, allowed: set[int] | None) -> set[int]:
    """The nonzero values of a mask; each must be in `allowed` (where given)."""
    import numpy as np

    values = {int(v) for v in np.unique(mask)} - {0}
    if negative := sorted(v for v in values if v < 0):
        raise NasError(path, f"holds the negative label value {negative[0]}")
    if allowed is not None and (undeclared := sorted(values - allowed)):
        known = ", ".join(str(v) for v in sorted(allowed | {0}))
        raise NasError(
            path,
            f"holds label value {undeclared[0]}, which dataset.json does not declare ({known})",
        )
    return values


def score_pairs(
    pairs: Sequence[Pair], regions: dict[str, tuple[int, ...]] | None, tolerance_mm: float
) -> pd.DataFrame:
    """One row of metrics per case and region; without `regions`, every nonzero value found
    is a region named by its value."""
    from tqdm import tqdm

    from nas.validation.metrics import ClassMetrics, as_table, case_metrics

    spacings = [check_grid(pair) for pair in pairs]  # headers first: fail before the slow part
    allowed = {v for values in regions.values() for v in values} if regions else None
    rows: dict[str, dict[str, ClassMetrics]] = {}
    found: set[int] = set()
    # disable=None: a progress bar on a terminal, nothing in a log file.
    progress = tqdm(list(zip(pairs, spacings, strict=True)), unit="case", leave=False, disable=None)
    for pair, spacing in progress:
        progress.set_postfix_str(pair.case)
        prediction, label = read_mask(pair.prediction), read_mask(pair.label)
        values = label_values(pair.prediction, prediction, allowed)
        values |= label_values(pair.label, label, allowed)
        found |= values
        case_regions = regions or {str(v): (v,) for v in sorted(values)}
        metrics = case_metrics(pair.case, prediction, label, spacing, case_regions, tolerance_mm)
        rows[pair.case] = {row.region: row for row in metrics}
    # A value absent from a case's files is, in that case, a region that both leave empty.
    names = list(regions) if regions else [str(v) for v in sorted(found)]
    if not names:
        raise NasError(
            pairs[0].label.parent,
            "no label or prediction holds a nonzero value; name the regions with --dataset-json",
        )
    return as_table(
        rows[pair.case].get(name) or ClassMetrics.both_empty(pair.case, name)
        for pair in pairs
        for name in names
    )


def write_scores(
    pairs: Sequence[Pair],
    regions: dict[str, tuple[int, ...]] | None,
    tolerance_mm: float,
    out: Path,
) -> dict:
    """Score `pairs`, write metrics.csv (one row per case and region) and summary.json (mean,
    median and sd per region, lesions pooled over cases) to `out`; the summary per region."""
    from nas.validation.metrics import summarize

    table = score_pairs(pairs, regions, tolerance_mm)
    summary = summarize(table)
    values = regions or {name: (int(name),) for name in summary}
    document = {
        "tolerance_mm": tolerance_mm,
        "n_cases": len(pairs),
        "regions": {
            name: {"label_values": list(values[name]), **stats} for name, stats in summary.items()
        },
    }
    atomic_write(out / "metrics.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(document, indent=2)))
    return summary
