"""Small datasets written as real NIfTI files in each layout users bring.

Two channels (an "MRI" and an "ADC"-like map), three label values (background, lesion core,
penumbra), anisotropic spacing, a different shape per case and a non-RAS (LPS) orientation;
and an nnU-Net dataset of three nested regions (region-based training, as in BraTS).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPES = ((20, 22, 10), (24, 20, 12), (22, 24, 11), (20, 20, 10))
SPACING_MM = (0.8, 0.8, 2.4)
CHANNELS = ("T2", "ADC")


def affine(spacing=SPACING_MM) -> np.ndarray:
    """LPS orientation: the first two axes run against RAS."""
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]) + np.array(
        [[0, 0, 0, 10.0], [0, 0, 0, 12.0], [0, 0, 0, -5.0], [0, 0, 0, 0]]
    )


def make_case(index: int, shape) -> tuple[list[np.ndarray], np.ndarray]:
    """Channels (float32) and a label with values 0, 1 (core) and 2 (penumbra around it)."""
    rng = np.random.default_rng(index)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"))
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    distance = np.sqrt((((grid.T - centre) / np.array([1, 1, 0.5])) ** 2).sum(-1)).T
    label = np.where(distance < 3, 1, np.where(distance < 5, 2, 0)).astype(np.uint8)
    t2 = 1.0 + 0.1 * rng.standard_normal(shape) + 1.5 * (label == 1) + 0.7 * (label == 2)
    adc = 2.0 + 0.1 * rng.standard_normal(shape) - 1.0 * (label > 0)
    return [t2.astype(np.float32), adc.astype(np.float32)], label


def save(data: np.ndarray, path: Path, spacing=SPACING_MM) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine(spacing)), path)
    return path


def write_nnunet(root: Path, n_cases: int = 4, make=make_case, labels=None) -> Path:
    """An nnU-Net v2 raw dataset of `n_cases` cases drawn by `make`; `labels`: the
    dataset.json entries declaring their labels (default: core and penumbra)."""
    for i in range(n_cases):
        channels, label = make(i, SHAPES[i % len(SHAPES)])
        for c, channel in enumerate(channels):
            save(channel, root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz")
        save(label, root / "labelsTr" / f"case_{i:03d}.nii.gz")
    meta = {
        "channel_names": {str(c): name for c, name in enumerate(CHANNELS)},
        **(labels or {"labels": {"background": 0, "core": 1, "penumbra": 2}}),
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))  # keys in order: regions need it
    return root


def write_msd(root: Path, n_cases: int = 4) -> Path:
    training = []
    for i in range(n_cases):
        channels, label = make_case(i, SHAPES[i % len(SHAPES)])
        save(np.stack(channels, -1), root / "imagesTr" / f"case_{i:03d}.nii.gz")
        save(label, root / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append(
            {"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"}
        )
    meta = {
        "name": "Lesions",
        "modality": {str(c): name for c, name in enumerate(CHANNELS)},
        "labels": {"0": "background", "1": "core", "2": "penumbra"},
        "numTraining": n_cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def write_pairs(root: Path, n_cases: int = 4) -> Path:
    for i in range(n_cases):
        channels, label = make_case(i, SHAPES[i % len(SHAPES)])
        save(channels[0], root / "images" / f"case_{i:03d}.nii.gz")
        save(label, root / "masks" / f"case_{i:03d}.nii.gz")
    return root


# BraTS-like: values 1 (outer shell), 2 (middle), 3 (centre), trained as nested regions, the
# last one declared as a plain value (nnU-Net allows both).
REGIONS = {"whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
REGIONS_CLASS_ORDER = [1, 2, 3]


def make_region_case(index: int, shape) -> tuple[list[np.ndarray], np.ndarray]:
    """Channels (float32) and a label of three nested spheres: 3 inside 2 inside 1."""
    rng = np.random.default_rng(100 + index)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"))
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    distance = np.sqrt((((grid.T - centre) / np.array([1, 1, 0.5])) ** 2).sum(-1)).T
    label = np.select([distance < 2, distance < 3.5, distance < 5], [3, 2, 1], 0).astype(np.uint8)
    t2 = 1.0 + 0.1 * rng.standard_normal(shape) + 0.6 * label
    adc = 2.0 + 0.1 * rng.standard_normal(shape) - 0.4 * label
    return [t2.astype(np.float32), adc.astype(np.float32)], label


def write_nnunet_regions(root: Path, n_cases: int = 4) -> Path:
    regions = {"labels": {"background": 0, **REGIONS}, "regions_class_order": REGIONS_CLASS_ORDER}
    return write_nnunet(root, n_cases, make_region_case, regions)
