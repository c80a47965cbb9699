"""Read a dataset in the nnU-Net v2 raw layout into memory as RAS-oriented, normalised cases.

Layout: imagesTr/{case}_{XXXX}{file_ending} (one file per channel), labelsTr/{case}{file_ending},
dataset.json with channel_names, labels (name -> value), numTraining and file_ending. Every
image is reoriented to RAS with nibabel and z-scored per channel; label values are mapped to
class indices 0..K in the order of their values. Knows nothing of training or the search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from nas.errors import NasError


@dataclass(frozen=True)
class Case:
    name: str
    image: np.ndarray  # (C, X, Y, Z) float32, RAS, z-scored per channel
    label: np.ndarray  # (X, Y, Z) uint8 class indices, 0 = background
    spacing_mm: tuple[float, float, float]


@dataclass(frozen=True)
class Dataset:
    root: Path
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]  # foreground classes, in class-index order 1..K
    cases: tuple[Case, ...]

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    @property
    def n_classes(self) -> int:
        """Foreground classes; the network has one sigmoid output when there is just one."""
        return len(self.class_names)


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise NasError(path, "not found: an nnU-Net v2 raw dataset needs dataset.json") from None
    except json.JSONDecodeError as err:
        raise NasError(path, f"not valid JSON ({err})") from None
    if not isinstance(content, dict):
        raise NasError(path, "must hold a JSON object")
    return content


def _load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """Data reoriented to RAS, its voxel spacing in mm and its original affine."""
    try:
        original = nib.load(path)
        canonical = nib.as_closest_canonical(original)
        data = np.asarray(canonical.dataobj)
    except FileNotFoundError:
        raise NasError(path, "not found") from None
    except Exception as err:  # nibabel raises many types for corrupt or truncated files
        raise NasError(path, f"cannot be read as NIfTI ({err})") from None
    if data.ndim != 3:
        raise NasError(path, f"expected a 3D volume, found shape {data.shape}")
    spacing = tuple(float(s) for s in canonical.header.get_zooms()[:3])
    return data, spacing, original.affine


def _zscore(channel: np.ndarray) -> np.ndarray:
    channel = channel.astype(np.float32)
    return (channel - channel.mean()) / max(float(channel.std()), 1e-8)


def read_nnunet_raw(root: Path) -> Dataset:
    """Load every training case of the dataset at `root`."""
    meta_path = root / "dataset.json"
    meta = _read_json(meta_path)
    for key in ("channel_names", "labels", "file_ending"):
        if key not in meta:
            raise NasError(meta_path, f"missing required key {key!r}")
    ending = meta["file_ending"]
    channels = sorted(meta["channel_names"], key=int)
    labels = sorted(meta["labels"].items(), key=lambda item: item[1])
    if not labels or labels[0][1] != 0:
        raise NasError(meta_path, "labels must declare background with value 0")
    value_to_class = {value: index for index, (_, value) in enumerate(labels)}

    label_files = sorted((root / "labelsTr").glob(f"*{ending}"))
    if not label_files:
        raise NasError(root / "labelsTr", f"holds no label files ending in {ending}")
    cases = []
    for label_path in label_files:
        name = label_path.name[: -len(ending)]
        label, spacing, label_affine = _load_nifti(label_path)
        images = []
        for channel in channels:
            image_path = root / "imagesTr" / f"{name}_{int(channel):04d}{ending}"
            image, _, image_affine = _load_nifti(image_path)
            if image.shape != label.shape or not np.allclose(image_affine, label_affine, atol=1e-3):
                raise NasError(
                    image_path, f"shape or affine differs from its label {label_path.name}"
                )
            images.append(_zscore(image))
        undeclared = set(np.unique(label).tolist()) - set(value_to_class)
        if undeclared:
            raise NasError(label_path, f"label values {sorted(undeclared)} not in dataset.json")
        class_index = np.zeros(int(max(value_to_class)) + 1, np.uint8)
        for value, index in value_to_class.items():
            class_index[int(value)] = index
        cases.append(Case(name, np.stack(images), class_index[label.astype(np.int64)], spacing))
    return Dataset(
        root=root,
        channel_names=tuple(meta["channel_names"][c] for c in channels),
        class_names=tuple(name for name, _ in labels[1:]),
        cases=tuple(cases),
    )
