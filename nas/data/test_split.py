"""A dataset's test split: the held-out cases in imagesTs/ + labelsTs/ beside imagesTr/
(labelsTs is not standard nnU-Net, but datasets often ship it), or in the folder `data.test`
names, found and checked as training cases are before a search starts. Scoring them is
nas/evaluation/heldout.py's job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nas.core.errors import NasError
from nas.data import DataConfig, Dataset
from nas.data.labels import LabelScheme
from nas.data.layouts import CaseFiles, find_scans, nifti_files
from nas.data.preprocess import (
    case_bytes_per_voxel,
    check_target_grid,
    read_channels,
    read_label,
)

IMAGES, LABELS = "imagesTs", "labelsTs"


@dataclass(frozen=True)
class TestSplit:
    __test__ = False  # a dataset's test split, not a pytest test class

    folder: Path  # holds imagesTs/ and labelsTs/
    cases: tuple[CaseFiles, ...]  # images: one file per channel, or one (4D) file
    class_of_value: dict[int, int]  # label value -> class index, as in training
    scheme: LabelScheme  # the classes (or regions) scored, as in training
    fingerprint: str  # of the files (paths, sizes, mtimes) and the class mapping


def find_test_split(data: DataConfig, dataset: Dataset) -> TestSplit | None:
    """The test cases of `data` (its `test` folder, else imagesTs/ + labelsTs/ inside the
    dataset), checked as training cases are; None when there are none to score. `dataset` is
    the training dataset as loaded for the search: its channels and label mapping apply."""
    folder = Path(data.test) if data.test is not None else dataset.root
    images, labels = folder / IMAGES, folder / LABELS
    if data.test is None and not (images.is_dir() and labels.is_dir()):
        return None  # nnU-Net's own imagesTs has no labels: nothing to score against
    if not folder.is_dir():
        raise NasError(folder, "test folder (data.test) not found")
    for sub in (images, labels):
        if not sub.is_dir():
            raise NasError(sub, f"not found: a test folder holds {IMAGES}/ and {LABELS}/")
    n_channels = len(dataset.source_channel_names)
    label_files = nifti_files(labels)
    cases = []
    for scan in find_scans(images, n_channels):
        if scan.name not in label_files:
            raise NasError(scan.images[0], f"test image without a label in {labels}")
        cases.append(CaseFiles(scan.name, scan.images, label_files.pop(scan.name)))
    if label_files:
        path = next(iter(label_files.values()))
        raise NasError(path, f"test label without an image in {images}")
    declared = "dataset.json" if (dataset.root / "dataset.json").is_file() else "the masks"
    for case in cases:
        _check_case(case, n_channels, dataset.plan.class_of_value, declared)
        check_target_grid(case.images[0], dataset.plan, case_bytes_per_voxel(dataset.plan))
    return TestSplit(
        folder,
        tuple(cases),
        dict(dataset.plan.class_of_value),
        dataset.scheme,
        _fingerprint(cases, dataset.plan.class_of_value),
    )


def _check_case(
    case: CaseFiles, n_channels: int, class_of_value: dict[int, int], declared: str
) -> None:
    """The checks a training case gets: channels, shapes, affines, finite voxels, labels."""
    channels, _, affine = read_channels(case.images, n_channels)  # finite voxels checked
    label = read_label(case, channels[0].shape, affine)
    undeclared = sorted(set(np.unique(label).tolist()) - set(class_of_value))
    if undeclared:
        known = ", ".join(str(v) for v in sorted(class_of_value))
        raise NasError(
            case.label, f"label values {undeclared} are not declared in {declared} ({known})"
        )


def _fingerprint(cases: Sequence[CaseFiles], class_of_value: dict[int, int]) -> str:
    files = []
    for case in cases:
        for path in (*case.images, case.label):
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"files": files, "classes": sorted(class_of_value.items())})
    return hashlib.sha256(blob.encode()).hexdigest()
