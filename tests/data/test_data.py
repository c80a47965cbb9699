"""The embedded dataset: real NIfTI files in nnU-Net v2 layout, read back through nibabel."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nas.core.errors import NasError
from nas.data import (
    DataConfig,
    PatchSampler,
    Slicing,
    SyntheticSpec,
    ensure_synthetic_dataset,
    load_dataset,
    split_cases,
)
from tests.conftest import TINY_SPEC


def test_layout_is_nnunet_v2_raw(tiny_dataset):
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == TINY_SPEC.n_cases
    assert meta["file_ending"] == ".nii.gz"
    images = sorted(p.name for p in (tiny_dataset / "imagesTr").iterdir())
    labels = sorted(p.name for p in (tiny_dataset / "labelsTr").iterdir())
    assert images == [f"lesion_{i:03d}_0000.nii.gz" for i in range(TINY_SPEC.n_cases)]
    assert labels == [f"lesion_{i:03d}.nii.gz" for i in range(TINY_SPEC.n_cases)]
    image = nib.load(tiny_dataset / "imagesTr" / images[0])
    assert image.shape == TINY_SPEC.shape
    assert np.allclose(image.header.get_zooms(), TINY_SPEC.spacing_mm)
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")


def test_generation_is_deterministic_and_seeded(tmp_path):
    spec = SyntheticSpec(n_cases=2, shape=(24, 24, 12), seed=5)
    a = ensure_synthetic_dataset(tmp_path / "a", spec)
    b = ensure_synthetic_dataset(tmp_path / "b", spec)
    c = ensure_synthetic_dataset(
        tmp_path / "c", SyntheticSpec(n_cases=2, shape=(24, 24, 12), seed=6)
    )
    for name in ("imagesTr/lesion_001_0000.nii.gz", "labelsTr/lesion_001.nii.gz"):
        data_a = np.asarray(nib.load(a / name).dataobj)
        assert np.array_equal(data_a, np.asarray(nib.load(b / name).dataobj))
    image = "imagesTr/lesion_000_0000.nii.gz"
    assert not np.array_equal(
        np.asarray(nib.load(a / image).dataobj), np.asarray(nib.load(c / image).dataobj)
    )


def test_default_dataset_has_small_varied_lesions_and_some_empty_cases(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "default", SyntheticSpec())
    lesion_counts, fractions = [], []
    for path in sorted((root / "labelsTr").iterdir()):
        label = np.asarray(nib.load(path).dataobj)
        lesion_counts.append(ndimage.label(label)[1])
        fractions.append(label.mean())
    assert len(lesion_counts) == 24
    assert 1 <= lesion_counts.count(0) <= 6  # a few cases without lesions
    assert max(lesion_counts) >= 3  # some with several
    assert max(fractions) < 0.02  # foreground stays tiny, as stroke lesions are


def test_existing_dataset_is_reused_not_regenerated(tiny_dataset):
    before = (tiny_dataset / "imagesTr" / "lesion_000_0000.nii.gz").stat().st_mtime_ns
    ensure_synthetic_dataset(tiny_dataset, TINY_SPEC)
    after = (tiny_dataset / "imagesTr" / "lesion_000_0000.nii.gz").stat().st_mtime_ns
    assert before == after


def test_a_different_dataset_in_the_folder_is_refused(tiny_dataset):
    with pytest.raises(NasError, match="holds a different dataset"):
        ensure_synthetic_dataset(tiny_dataset, SyntheticSpec(n_cases=7, shape=(32, 32, 16)))


def test_reader_reorients_to_ras_and_normalises(tiny_dataset):
    dataset = load_dataset(DataConfig(path=tiny_dataset))
    assert dataset.in_channels == 1 and dataset.n_classes == 1
    case = dataset.cases[0]
    raw = nib.load(tiny_dataset / "labelsTr" / f"{case.name}.nii.gz")
    # Stored LAS: RAS flips the first axis (no crop: the background is noisy, never zero).
    assert np.array_equal(case.label, np.asarray(raw.dataobj)[::-1])
    assert case.image.shape == (1, *TINY_SPEC.shape) and case.image.dtype == np.float32
    assert abs(float(case.image.mean())) < 1e-3 and abs(float(case.image.std()) - 1) < 1e-3
    assert case.spacing_mm == TINY_SPEC.spacing_mm


def test_data_section_defaults_to_the_embedded_dataset():
    assert DataConfig().synthetic == SyntheticSpec()
    assert DataConfig(path="elsewhere").synthetic is None
    with pytest.raises(ValueError, match="fold 5 does not exist"):
        DataConfig(n_folds=5, fold=5)


def test_mismatched_label_is_one_clear_error(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "d", SyntheticSpec(n_cases=2, shape=(16, 16, 8)))
    label = root / "labelsTr" / "lesion_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 9), np.uint8), np.eye(4)), label)
    with pytest.raises(NasError, match="shape .* or affine differs") as info:
        load_dataset(DataConfig(path=root))
    assert str(label) in str(info.value)


def test_folds_split_by_case_disjoint_seeded_and_covering(tiny_cases):
    seen_val = []
    for fold in range(3):
        train, val = split_cases(tiny_cases, n_folds=3, fold=fold, seed=0)
        train_names, val_names = {c.name for c in train}, {c.name for c in val}
        assert not train_names & val_names
        assert train_names | val_names == {c.name for c in tiny_cases}
        assert len(val) == 2
        seen_val += sorted(val_names)
        again = split_cases(tiny_cases, n_folds=3, fold=fold, seed=0)[1]
        assert [c.name for c in again] == [c.name for c in val]
    assert sorted(seen_val) == sorted(c.name for c in tiny_cases)  # each case validated once
    with pytest.raises(ValueError, match="fewer than the 7 folds"):
        split_cases(tiny_cases, n_folds=7, fold=0, seed=0)


@pytest.mark.parametrize(
    ("patch", "some_miss_the_lesion"),
    # A patch larger than the volume always holds the whole lesion.
    [((32, 32), True), ((24, 24, 8), True), ((40, 40, 20), False)],
)
def test_sampler_shapes_and_foreground_oversampling(tiny_cases, patch, some_miss_the_lesion):
    cases = [c for c in tiny_cases if c.label.any()]
    assert len(cases) >= 2
    sampler = PatchSampler(
        cases, patch, batch_size=6, foreground_fraction=1.0, augment=True, seed=0
    )
    for _ in range(5):
        images, labels = sampler.sample()
        assert images.shape == (6, 1, *patch) and labels.shape == (6, *patch)
        assert all(label.any() for label in labels)  # every sample centred on a lesion
    rare = PatchSampler(cases, patch, batch_size=64, foreground_fraction=0.0, augment=False, seed=0)
    with_lesion = rare.sample()[1].reshape(64, -1).any(1).mean()
    assert (with_lesion < 1.0) == some_miss_the_lesion


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_along_any_axis(tiny_cases, axis):
    in_plane = [n for a, n in enumerate(TINY_SPEC.shape) if a != axis]
    sampler = PatchSampler(tiny_cases, in_plane, 4, 0.5, False, seed=0, slicing=Slicing(axis))
    images, labels = sampler.sample()
    assert images.shape == (4, 1, *in_plane) and labels.shape == (4, *in_plane)
    # Without augmentation a slice is exactly a slice of some case along that axis.
    slices = [np.moveaxis(np.asarray(c.image[0]), axis, 0) for c in tiny_cases]
    assert any(np.array_equal(images[0, 0], s[i]) for s in slices for i in range(len(s)))


def test_slices_per_case_limits_training_slices(tiny_cases):
    slicing = Slicing(axis=2, per_case=3, seed=0)
    sampler = PatchSampler(tiny_cases, (32, 32), 64, 0.5, False, seed=0, slicing=slicing)
    assert all(len(s) == 3 for s in sampler.slices)
    for case, slices in zip(sampler.cases, sampler.slices, strict=True):
        with_fg = set(np.flatnonzero(np.asarray(case.label).any(axis=(0, 1))))
        assert len(set(slices) & with_fg) >= min(2, len(with_fg))  # half from lesion slices
    drawn = {tuple(np.asarray(img[0]).ravel()[:8]) for img in sampler.sample()[0]}
    allowed = {
        tuple(np.asarray(c.image[0, :, :, z]).ravel()[:8])
        for c, s in zip(sampler.cases, sampler.slices, strict=True)
        for z in s
    }
    assert drawn <= allowed
