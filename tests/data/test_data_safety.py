"""What the data pipeline must never do silently: reuse a stale or damaged cache, accept a
voxel spacing or a split it cannot use, lose a thin case, wrap a label value, or let two
cases share a name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nas.core.errors import NasError
from nas.data import DataConfig, load_dataset, split_dataset
from nas.data.cache import open_cache
from nas.deploy.predict import mask_values, write_mask
from tests import datasets
from tests.conftest import TINY_SPEC


def _load(root: Path, cache: Path, **settings):
    return load_dataset(DataConfig(path=root, cache_dir=cache, n_folds=2, **settings))


def _rewrite_json(root: Path, change) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


# --- the cache ---------------------------------------------------------------------------


def test_renaming_a_channel_in_dataset_json_rebuilds_the_cache(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    mri = _load(root, tmp_path / "cache")
    assert mri.plan.norms[0].clip is None  # T2: z-scored per case
    _rewrite_json(root, lambda meta: meta["channel_names"].update({"0": "CT"}))
    ct = _load(root, tmp_path / "cache")
    assert ct.cache != mri.cache
    assert ct.channel_names == ("CT", "ADC")
    assert ct.plan.norms[0].clip is not None  # CT: clipped to the dataset's percentiles


def test_cache_files_reach_the_disk_before_the_folder_is_renamed(tmp_path, monkeypatch):
    root = datasets.write_nnunet(tmp_path / "ds")
    cache = tmp_path / "cache"
    synced: dict[int, bool] = {}  # inode -> whether a cache was in place already
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        in_place = [p for p in cache.glob("*/manifest.json") if not p.parent.name.startswith(".")]
        synced[os.fstat(fd).st_ino] = bool(in_place)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    dataset = _load(root, cache)
    files = sorted(dataset.cache.iterdir())
    assert {p.name for p in files} >= {"manifest.json", "case_000_image.npy", "case_000_label.npy"}
    for path in files:  # a rename keeps the inode: these are the files that were synced
        assert synced.get(path.stat().st_ino) is False, f"{path.name} not synced before rename"


def test_staging_folders_of_a_killed_build_are_removed(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    cache = tmp_path / "cache"
    killed_build = (
        "import os, signal, sys; from pathlib import Path\n"
        "from nas.core.staging import staging_folder\n"
        "building = staging_folder(Path(sys.argv[1]) / 'ds-0123456789abcdef')\n"
        "(building.__enter__() / 'case_000_image.npy').write_bytes(b'half written')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    killed = subprocess.run([sys.executable, "-c", killed_build, str(cache)], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert len(list(cache.glob(".ds-*"))) == 1
    _load(root, cache)
    assert not list(cache.glob(".*"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble_header(path: Path) -> None:
    path.write_bytes(b"not an npy header" + path.read_bytes()[17:])


DAMAGE = {
    "truncated_image": ("case_001_image.npy", _truncate),
    "truncated_label": ("case_002_label.npy", _truncate),
    "scrambled_header": ("case_000_image.npy", _scramble_header),
    "truncated_manifest": ("manifest.json", _truncate),
    "manifest_not_a_cache": ("manifest.json", lambda p: p.write_text('{"cases": 3}')),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_cache_is_rebuilt_once_with_one_line(name, tmp_path, capsys):
    root = datasets.write_nnunet(tmp_path / "ds")
    first = _load(root, tmp_path / "cache")
    folder, expected = first.cache, [np.array(case.image) for case in first.cases]
    del first  # its arrays map the files about to be damaged
    damaged, damage = DAMAGE[name]
    damage(folder / damaged)
    capsys.readouterr()

    again = _load(root, tmp_path / "cache")
    assert again.cache == folder
    for case, image in zip(again.cases, expected, strict=True):
        assert np.array_equal(case.image, image)
    lines = [line for line in capsys.readouterr().err.splitlines() if "rebuil" in line]
    assert len(lines) == 1 and damaged in lines[0]
    _load(root, tmp_path / "cache")  # repaired: opened without rebuilding
    assert "rebuil" not in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_opening_a_damaged_cache_is_one_error_naming_the_file(name, tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    folder = _load(root, tmp_path / "cache").cache
    damaged, damage = DAMAGE[name]
    damage(folder / damaged)
    with pytest.raises(NasError) as info:
        open_cache(folder, root)
    assert info.value.source == str(folder / damaged)


# --- voxel spacing -----------------------------------------------------------------------


def _save_with_stored_spacing(path: Path, spacing: tuple[float, float, float]) -> None:
    """Rewrite `path` with these voxel sizes in its header (pixdim), as a faulty writer would."""
    image = nib.load(path)
    bad = nib.Nifti1Image(np.asarray(image.dataobj), image.affine)
    bad.header["pixdim"][1:4] = spacing
    nib.save(bad, path)


@pytest.mark.parametrize("spacing", [(0.8, 0.0, 2.4), (-0.8, 0.8, 2.4), (0.8, 0.8, np.nan)])
def test_zero_negative_or_nan_voxel_spacing_is_refused(spacing, tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    culprit = root / "imagesTr" / "case_002_0000.nii.gz"
    _save_with_stored_spacing(culprit, spacing)
    with pytest.raises(NasError, match=r"voxel spacing \(.*\) must be positive and finite") as info:
        _load(root, tmp_path / "cache")
    assert info.value.source == str(culprit)


@pytest.mark.parametrize("spacing", [(1.0, 0.0, 1.0), (1.0, 1.0, -2.0), (np.nan, 1.0, 1.0)])
def test_target_spacing_must_be_positive_and_finite(spacing):
    with pytest.raises(ValueError, match="target_spacing_mm") as info:
        DataConfig(target_spacing_mm=spacing)
    assert "positive and finite" in str(info.value)
    with pytest.raises(ValueError, match="target_spacing_mm"):
        DataConfig(target_spacing_mm=(1.0, float("inf"), 1.0))


# --- resampling --------------------------------------------------------------------------


def test_a_one_voxel_thick_crop_keeps_one_voxel_when_resampled_coarser(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    for channel in (0, 1):  # case_000 is nonzero on a single axial slice only
        path = root / "imagesTr" / f"case_000_{channel:04d}.nii.gz"
        data = np.asarray(nib.load(path).dataobj).copy()
        data[..., :4], data[..., 5:] = 0, 0
        datasets.save(data, path)
    # 2.4 mm slices resampled to 6 mm: one slice is 0.4 of a voxel, which rounds to none.
    dataset = _load(root, tmp_path / "cache", target_spacing_mm=(0.8, 0.8, 6.0))
    thin = dataset.cases[0]
    assert thin.image.shape == (2, *datasets.SHAPES[0][:2], 1)
    assert thin.label.shape == thin.image.shape[1:]
    assert dataset.cases[1].image.shape[3] == 5  # 12 slices of 2.4 mm: 28.8 mm in 6 mm voxels


# --- the validation split ----------------------------------------------------------------


def test_a_validation_fold_without_some_class_is_refused(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    for i in (1, 2, 3):  # only case_000 shows the penumbra (label value 2)
        path = root / "labelsTr" / f"case_{i:03d}.nii.gz"
        label = np.asarray(nib.load(path).dataobj).copy()
        label[label == 2] = 0
        datasets.save(label, path)
    refused = []
    for fold in range(4):  # one case per fold
        cfg = DataConfig(path=root, cache_dir=tmp_path / "cache", n_folds=4, fold=fold)
        dataset = load_dataset(cfg)
        try:
            _, val = split_dataset(dataset, cfg)
        except NasError as err:
            refused.append(err)
        else:
            assert [case.name for case in val] == ["case_000"]
    assert len(refused) == 3
    for err in refused:
        assert err.source == str(root)
        assert "'penumbra'" in err.reason and "'core'" not in err.reason
        assert "split_seed" in err.reason and "fold" in err.reason


@pytest.mark.parametrize(("n_folds", "fold"), [(3, 0), (3, 1), (3, 2), (2, 0), (2, 1)])
def test_the_tiny_dataset_splits_are_accepted(tiny_dataset, n_folds, fold):
    cfg = DataConfig(path=tiny_dataset, n_folds=n_folds, fold=fold)
    train, val = split_dataset(load_dataset(cfg), cfg)
    assert len(train) + len(val) == TINY_SPEC.n_cases


# --- label values in predicted masks -----------------------------------------------------


@pytest.mark.parametrize(
    ("largest", "dtype"),
    [(255, np.uint8), (256, np.uint16), (65535, np.uint16), (70000, np.uint32)],
)
def test_mask_values_keep_every_label_value(largest, dtype):
    values = mask_values({"background": 0, "lesion": 3, "vessel": largest})
    assert values.dtype == dtype
    assert values.tolist() == [0, 3, largest]


def test_a_mask_with_label_values_above_255_is_written_unchanged(tmp_path):
    like = nib.load(datasets.save(np.zeros((4, 5, 6), np.float32), tmp_path / "scan.nii.gz"))
    classes = np.zeros((4, 5, 6), np.uint8)
    classes[1:3, 2:4, 3:5] = 1
    classes[0, 0, 0] = 2
    mask = mask_values({"background": 0, "lesion": 300, "edema": 1000})[classes]
    write_mask(mask, like, tmp_path / "mask.nii.gz")
    written = nib.load(tmp_path / "mask.nii.gz")
    assert np.array_equal(np.asarray(written.dataobj), mask)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) == {0, 300, 1000}
    assert np.allclose(written.affine, like.affine)


# --- case names --------------------------------------------------------------------------


def test_two_msd_entries_with_the_same_case_name_are_refused(tmp_path):
    root = datasets.write_msd(tmp_path / "ds")
    for folder in ("imagesTr", "labelsTr"):
        (root / "other" / folder).mkdir(parents=True)
        shutil.copy(root / folder / "case_001.nii.gz", root / "other" / folder / "case_000.nii.gz")
    _rewrite_json(
        root,
        lambda meta: meta["training"].append(
            {"image": "other/imagesTr/case_000.nii.gz", "label": "other/labelsTr/case_000.nii.gz"}
        ),
    )
    with pytest.raises(NasError, match="case_000") as info:
        _load(root, tmp_path / "cache")
    message = str(info.value)
    assert str(root / "imagesTr" / "case_000.nii.gz") in message
    assert str(root / "other" / "imagesTr" / "case_000.nii.gz") in message


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_pairs_with_the_same_name_in_two_endings_are_refused(tmp_path, folder):
    root = datasets.write_pairs(tmp_path / "ds")
    # A stray uncompressed copy beside case_001.nii.gz: which of the two is case_001?
    nib.save(nib.load(root / folder / "case_001.nii.gz"), root / folder / "case_001.nii")
    with pytest.raises(NasError, match="case_001") as info:
        _load(root, tmp_path / "cache")
    message = str(info.value)
    assert str(root / folder / "case_001.nii") in message
    assert str(root / folder / "case_001.nii.gz") in message
