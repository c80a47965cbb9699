"""Fingerprint a dataset and decide how every case is preprocessed (a `CasePlan`).

From the index and the data settings: which channels feed the network, which label values
form each foreground class (and, for a region-based dataset, which classes form each region:
the `LabelScheme`), the target spacing (default: the median spacing of the cases, as
nnU-Net does) and each channel's normalisation (CT: clip to the 0.5-99.5 percentiles of the
dataset's foreground voxels, then z-score with their mean and std; other modalities: z-score
per case). Reads headers for spacings, and voxels only where CT statistics or undeclared
label values require them, one case at a time. A case whose grid at the target spacing would
not fit in the memory available is refused before any case is resampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from nas.core.errors import NasError
from nas.data.labels import LabelScheme
from nas.data.layouts import DatasetIndex
from nas.data.preprocess import (
    CasePlan,
    Normalization,
    case_bytes_per_voxel,
    check_target_grid,
    read_channels,
    read_label,
    spacing_of,
)

# Foreground voxels kept per case for the CT intensity statistics.
CT_SAMPLES_PER_CASE = 10_000


def _source(index: DatasetIndex):
    return index.root / "dataset.json" if index.labels is not None else index.root


def choose_channels(index: DatasetIndex, wanted: Sequence[int | str] | None) -> tuple[int, ...]:
    if wanted is None:
        return tuple(range(len(index.channel_names)))
    chosen = []
    for item in wanted:
        if isinstance(item, str):
            if item not in index.channel_names:
                raise NasError(
                    _source(index), f"has no channel named {item!r} (has {index.channel_names})"
                )
            chosen.append(index.channel_names.index(item))
        elif 0 <= item < len(index.channel_names):
            chosen.append(item)
        else:
            raise NasError(
                _source(index), f"has no channel {item} (has {len(index.channel_names)})"
            )
    return tuple(chosen)


def _label_values(index: DatasetIndex) -> dict[str, int]:
    """Declared labels, or for plain pairs every value found in the masks."""
    if index.labels is not None:
        return index.labels
    found: set[int] = set()
    for case in index.cases:
        channels, _, affine = read_channels(case.images, 1)
        found |= set(np.unique(read_label(case, channels[0].shape, affine)).tolist())
    return {"background": 0} | {f"label_{v}": v for v in sorted(found - {0})}


def choose_classes(
    index: DatasetIndex, foreground: Mapping[str, Sequence[int]] | None
) -> tuple[dict[int, int], tuple[str, ...]]:
    """Label value -> class index, and the foreground class names (class 1, 2, ...)."""
    values = _label_values(index)
    if index.regions and foreground is not None:
        raise NasError(
            _source(index),
            "declares regions (region-based training), which data.foreground cannot regroup; "
            "leave data.foreground out, or change the regions in dataset.json",
        )
    if foreground is None:
        named = sorted(((v, n) for n, v in values.items() if v != 0))
        foreground = {name: [value] for value, name in named}
    class_of_value = {value: 0 for value in values.values()}  # unlisted values: background
    for class_index, (name, members) in enumerate(foreground.items(), start=1):
        for value in members:
            if value not in class_of_value:
                raise NasError(
                    _source(index),
                    f"declares no label value {value} (foreground class {name!r} asks for it)",
                )
            class_of_value[value] = class_index
    if not foreground:
        raise NasError(_source(index), "declares no foreground label")
    return class_of_value, tuple(foreground)


def _ct_norm(index: DatasetIndex, channel: int) -> Normalization:
    rng = np.random.default_rng(0)
    samples = []
    for case in index.cases:
        channels, _, affine = read_channels(case.images, len(index.channel_names))
        label = read_label(case, channels[0].shape, affine)
        voxels = channels[channel][label > 0]
        if len(voxels) > CT_SAMPLES_PER_CASE:
            voxels = rng.choice(voxels, CT_SAMPLES_PER_CASE, replace=False)
        samples.append(voxels.astype(np.float64))
    foreground = np.concatenate(samples) if samples else np.zeros(0)
    if foreground.size == 0:
        return Normalization()  # no foreground anywhere: fall back to per-case z-score
    low, high = np.percentile(foreground, [0.5, 99.5])
    clipped = np.clip(foreground, low, high)
    return Normalization(
        clip=(float(low), float(high)), mean=float(clipped.mean()), std=float(clipped.std())
    )


def make_plan(
    index: DatasetIndex,
    channels: Sequence[int | str] | None,
    foreground: Mapping[str, Sequence[int]] | None,
    target_spacing_mm: Sequence[float] | None,
    normalization: str,
) -> tuple[CasePlan, LabelScheme]:
    """The plan for every case, and what the network is to output."""
    chosen = choose_channels(index, channels)
    class_of_value, class_names = choose_classes(index, foreground)
    try:
        scheme = LabelScheme.build(
            class_of_value, class_names, index.regions, index.regions_class_order
        )
    except ValueError as err:  # a data.foreground class listing no value
        raise NasError(_source(index), str(err)) from None
    if target_spacing_mm is None:
        spacings = np.array([spacing_of(case.images[0]) for case in index.cases])
        target_spacing_mm = tuple(float(s) for s in np.median(spacings, axis=0))
    norms = []
    for channel in chosen:
        is_ct = index.channel_names[channel].strip().lower() == "ct"
        mode = normalization if normalization != "auto" else ("ct" if is_ct else "zscore")
        norms.append(_ct_norm(index, channel) if mode == "ct" else Normalization())
    plan = CasePlan(channels=chosen, norms=tuple(norms), class_of_value=class_of_value,
                    target_spacing_mm=tuple(target_spacing_mm))  # fmt: skip
    for case in index.cases:  # before any case is resampled: every grid fits
        check_target_grid(case.images[0], plan, case_bytes_per_voxel(plan))
    return plan, scheme
