"""Generate the embedded default dataset: brain-like MRI volumes with small focal lesions.

Each case is drawn deterministically from (seed, case index) and written as real .nii.gz
files in the nnU-Net v2 raw layout (imagesTr/, labelsTr/, dataset.json), so the default
search reads its data through exactly the path a user's dataset takes. The volumes are stored
in LAS orientation with anisotropic spacing, as many scanners write them, so the reader's
reorientation is exercised too. This module knows nothing of training or of the search.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass
from scipy import ndimage

from nas.core.errors import NasError

# Mean intensity of each tissue class on a FLAIR-like contrast, before bias field and noise.
TISSUE_INTENSITY = {"background": 0.0, "scalp": 0.35, "csf": 0.12, "gm": 0.55, "wm": 0.7}


# Bounds on what a search space may ask to generate. Generating one case holds about 120 bytes
# per voxel (float64 grids and noise fields): 2 GB at 256^3 but 16 GB at 512^3, so axes stop at
# 256; 1000 such cases are still ~60 GB of .nii.gz. Below 8 voxels an axis cannot hold the head,
# a ventricle and a lesion.
MAX_CASES = 1000
MIN_AXIS, MAX_AXIS = 8, 256


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SyntheticSpec:
    """What to generate: the same spec and seed always give the same files."""

    n_cases: int = Field(24, ge=1, le=MAX_CASES)
    shape: tuple[int, int, int] = (64, 64, 32)
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy takes seeds below 2**32

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(MIN_AXIS <= size <= MAX_AXIS for size in value):
            raise ValueError(
                f"shape must be between {MIN_AXIS} and {MAX_AXIS} per axis, got {value}"
            )
        return value

    @field_validator("spacing_mm")
    @classmethod
    def _check_spacing(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0 < size < math.inf for size in value):
            raise ValueError(f"spacing_mm must be positive and finite, got {value}")
        return value


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def _ellipsoid(grid: np.ndarray, centre, radii) -> np.ndarray:
    """Normalised squared distance from `centre`: < 1 inside the ellipsoid."""
    return sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3))


def _make_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """One (image, label) pair in voxel space; image float32, label uint8 (0 or 1)."""
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    head_radii = rng.uniform(0.82, 0.95, 3)
    head = _ellipsoid(grid, rng.uniform(-0.04, 0.04, 3), head_radii)
    brain = head < 0.78
    scalp = (head < 1.0) & ~brain

    # Grey and white matter from a smooth random field; CSF in ventricles and the brain's rim.
    tissue_field = _smooth_noise(rng, shape, sigma=3.0) + 1.5 * (0.78 - head)
    wm = brain & (tissue_field > 0.6)
    ventricles = _ellipsoid(grid, (0, rng.uniform(-0.05, 0.05), 0), (0.28, 0.12, 0.3)) < 1.0
    csf = brain & (ventricles | (head > 0.7))
    image = np.zeros(shape, np.float64)
    image[scalp] = TISSUE_INTENSITY["scalp"]
    image[brain] = TISSUE_INTENSITY["gm"]
    image[wm] = TISSUE_INTENSITY["wm"]
    image[csf] = TISSUE_INTENSITY["csf"]
    image = ndimage.gaussian_filter(image, 0.7)

    # Lesions: most cases have one or two, some several, a few none (as in stroke cohorts).
    n_lesions = rng.choice([0, 1, 2, 3, 4], p=[0.1, 0.35, 0.3, 0.15, 0.1])
    label = np.zeros(shape, np.uint8)
    candidates = np.argwhere(brain & ~csf)
    voxel = np.array(shape, np.float64)
    for _ in range(n_lesions):
        centre_voxel = candidates[rng.integers(len(candidates))]
        centre = centre_voxel / (voxel - 1) * 2 - 1
        radius_voxels = rng.uniform(2.0, 6.5) * rng.uniform(0.7, 1.3, 3) * np.array([1, 1, 0.5])
        radii = np.maximum(radius_voxels, 1.0) / (voxel - 1) * 2
        # A lumpy boundary, so lesions are not perfect ellipsoids.
        distance = _ellipsoid(grid, centre, radii) + 0.25 * _smooth_noise(rng, shape, 1.5)
        lesion = (distance < 1.0) & brain & ~csf
        contrast = rng.uniform(1.5, 2.2)
        profile = np.clip(
            (1.3 - distance) / 0.6, 0.0, 1.0
        )  # soft edge, half contrast at the border
        image = image * (1 + (contrast - 1) * profile * (brain & ~csf))
        label[lesion] = 1

    bias = np.exp(0.12 * _smooth_noise(rng, shape, sigma=12.0))
    sigma = rng.uniform(0.025, 0.05)
    signal = image * bias
    # Rician noise, as magnitude MR images have.
    image = np.hypot(
        signal + sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape)
    )
    return image.astype(np.float32), label


def _las_affine(spec: SyntheticSpec) -> np.ndarray:
    """Voxel-to-world in LAS orientation (x flipped), centred on the volume."""
    spacing = np.array(spec.spacing_mm)
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(spec.shape) - 1) / 2)
    return affine


def _write(spec: SyntheticSpec, folder: Path) -> None:
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    affine = _las_affine(spec)
    for index in range(spec.n_cases):
        rng = np.random.default_rng([spec.seed, index])
        image, label = _make_case(rng, spec.shape)
        case = f"lesion_{index:03d}"
        for data, path in (
            (image, folder / "imagesTr" / f"{case}_0000.nii.gz"),
            (label, folder / "labelsTr" / f"{case}.nii.gz"),
        ):
            nifti = nib.Nifti1Image(data, affine)
            nifti.header.set_xyzt_units("mm")
            nib.save(nifti, path)
    dataset = {
        "name": "SyntheticLesions",
        "description": "Brain-like MRI volumes with small focal lesions, generated by nas",
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": spec.n_cases,
        "file_ending": ".nii.gz",
        "nas_synthetic": asdict(spec),
    }
    # Written last: its presence marks a complete dataset.
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def ensure_synthetic_dataset(root: Path, spec: SyntheticSpec) -> Path:
    """Generate the dataset at `root` unless that exact dataset is already there."""
    marker = root / "dataset.json"
    if marker.exists():
        try:
            existing = json.loads(marker.read_text()).get("nas_synthetic")
        except (json.JSONDecodeError, AttributeError) as err:
            raise NasError(marker, f"not valid JSON ({err})") from None
        if existing != json.loads(json.dumps(asdict(spec))):
            raise NasError(
                root,
                f"holds a different dataset than the synthetic one requested ({existing} vs "
                f"{asdict(spec)}); choose another data.path or delete the folder",
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise NasError(root, "exists without dataset.json; refusing to generate data into it")
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted run never leaves half a dataset.
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _write(spec, staging / "dataset")
        if root.exists():
            root.rmdir()
        os.replace(staging / "dataset", root)
    except FileExistsError:
        pass  # another process finished first; its dataset is identical
    except OSError as err:
        if not (root / "dataset.json").exists():
            raise NasError(root, f"cannot write the synthetic dataset ({err})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
