"""Users' datasets: nnU-Net v2, MSD and plain pairs; preprocessing, the cache and bad data."""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pytest

from nas.core.errors import NasError
from nas.core.locking import file_lock
from nas.data import DataConfig, load_dataset, split_dataset
from nas.search.record import TrialRecord
from tests import datasets
from tests.conftest import run_cli


def _load(root: Path, cache: Path, **settings):
    return load_dataset(DataConfig(path=root, cache_dir=cache, n_folds=2, **settings))


@pytest.mark.parametrize("writer", [datasets.write_nnunet, datasets.write_msd])
def test_multichannel_multiclass_anisotropic_dataset(tmp_path, writer):
    dataset = _load(writer(tmp_path / "ds"), tmp_path / "cache")
    assert dataset.channel_names == datasets.CHANNELS
    assert dataset.class_names == ("core", "penumbra")
    assert dataset.in_channels == 2 and dataset.n_classes == 2
    assert len(dataset.cases) == 4
    median_spacing = datasets.SPACING_MM  # every case has the same spacing
    for case, shape in zip(dataset.cases, datasets.SHAPES, strict=True):
        assert case.spacing_mm == pytest.approx(median_spacing)
        assert case.image.shape == (2, *shape) and case.label.shape == shape
        assert set(np.unique(case.label)) == {0, 1, 2}
        for channel in case.image:  # z-scored per case and channel
            assert abs(float(channel.mean())) < 1e-3 and abs(float(channel.std()) - 1) < 1e-3


def test_the_same_cases_give_the_same_arrays_in_every_layout(tmp_path):
    nnunet = _load(datasets.write_nnunet(tmp_path / "a"), tmp_path / "cache")
    msd = _load(datasets.write_msd(tmp_path / "b"), tmp_path / "cache")
    pairs = _load(datasets.write_pairs(tmp_path / "c"), tmp_path / "cache")
    assert pairs.channel_names == ("image",) and pairs.class_names == ("label_1", "label_2")
    for a, b, c in zip(nnunet.cases, msd.cases, pairs.cases, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert np.array_equal(a.image[:1], c.image) and np.array_equal(a.label, c.label)


def test_reorientation_to_ras(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    case = _load(root, tmp_path / "cache").cases[0]
    stored = np.asarray(nib.load(root / "labelsTr" / "case_000.nii.gz").dataobj)
    assert np.array_equal(case.label, stored[::-1, ::-1, :])  # LPS -> RAS flips x and y


def test_channels_foreground_merge_and_spacing_are_chosen_in_the_yaml(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    dataset = _load(
        root,
        tmp_path / "cache",
        channels=("ADC",),
        foreground={"lesion": (1, 2)},
        target_spacing_mm=(1.6, 1.6, 2.4),
    )
    assert dataset.channel_names == ("ADC",) and dataset.class_names == ("lesion",)
    case = dataset.cases[0]
    assert case.image.shape == (1, 10, 11, 10)  # (20, 22, 10) at half the in-plane resolution
    assert set(np.unique(case.label)) == {0, 1}
    assert case.spacing_mm == (1.6, 1.6, 2.4)


def test_ct_channels_use_dataset_statistics_and_clip_outliers(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "ADC"}
    (root / "dataset.json").write_text(json.dumps(meta))
    outlier_path = root / "imagesTr" / "case_001_0000.nii.gz"
    with_outlier = np.asarray(nib.load(outlier_path).dataobj).copy()
    with_outlier[0, 0, 0] = 1e5
    datasets.save(with_outlier, outlier_path)
    dataset = _load(root, tmp_path / "cache")

    def slope(case_index: int, channel: int) -> float:
        path = root / "imagesTr" / f"case_{case_index:03d}_{channel:04d}.nii.gz"
        raw = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj).ravel()
        normalised = np.asarray(dataset.cases[case_index].image[channel]).ravel()
        # Only voxels inside the clip range (CT clips to the lesion intensities' percentiles).
        inside = (normalised > normalised.min() + 1e-5) & (normalised < normalised.max() - 1e-5)
        keep = inside & (raw < 100)
        return float(np.polyfit(raw[keep], normalised[keep], 1)[0])

    # CT: one affine map for the whole dataset; ADC: z-scored per case.
    assert slope(0, 0) == pytest.approx(slope(2, 0), rel=1e-3)
    assert slope(0, 1) != pytest.approx(slope(2, 1), rel=1e-3)
    ct = np.asarray(dataset.cases[1].image[0])
    assert ct[-1, -1, 0] == pytest.approx(ct.max())  # the outlier (LPS to RAS flips x, y) ...
    assert ct.max() < slope(2, 0) * 1e5 / 100  # ... is clipped, not scaled


def test_the_cache_is_reused_without_reading_nifti(tmp_path, monkeypatch):
    root = datasets.write_nnunet(tmp_path / "ds")
    first = _load(root, tmp_path / "cache")
    assert isinstance(first.cases[0].image, np.memmap)

    def no_nifti(*args, **kwargs):
        raise AssertionError("a NIfTI file was read")

    monkeypatch.setattr(nib, "load", no_nifti)
    again = _load(root, tmp_path / "cache")
    assert again.cache == first.cache
    monkeypatch.undo()

    changed_settings = _load(root, tmp_path / "cache", foreground={"lesion": (1, 2)})
    assert changed_settings.cache != first.cache
    datasets.save(
        np.ones(datasets.SHAPES[1], np.float32), root / "imagesTr" / "case_001_0001.nii.gz"
    )
    changed_input = _load(root, tmp_path / "cache")
    assert changed_input.cache not in (first.cache, changed_settings.cache)
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 3


def _build_in_child(root: str, cache: str, queue) -> None:
    dataset = _load(Path(root), Path(cache))
    queue.put((str(dataset.cache), [float(np.asarray(c.image).sum()) for c in dataset.cases]))


def test_two_processes_building_the_cache_at_once(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    context = mp.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_build_in_child, args=(str(root), str(tmp_path / "cache"), queue))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    assert results[0] == results[1]
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1
    assert not list((tmp_path / "cache").glob(".*"))  # no staging folder left behind


def test_splits_file_in_nnunet_format(tmp_path):
    root = datasets.write_nnunet(tmp_path / "ds")
    splits = tmp_path / "splits_final.json"
    splits.write_text(
        json.dumps(
            [
                {"train": ["case_000", "case_001"], "val": ["case_002", "case_003"]},
                {"train": ["case_002", "case_003"], "val": ["case_000", "case_001"]},
            ]
        )
    )
    cfg = DataConfig(path=root, cache_dir=tmp_path / "cache", splits_file=splits, fold=1)
    train, val = split_dataset(load_dataset(cfg), cfg)
    assert [c.name for c in val] == ["case_000", "case_001"]
    assert [c.name for c in train] == ["case_002", "case_003"]


# Each bad dataset: how to break a valid nnU-Net dataset, the file the message must name
# (relative to the dataset root; "" for the root itself) and what it must say.
def _remove(path: Path) -> None:
    path.unlink()


def _rewrite_json(root: Path, change) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _save_shifted(path: Path) -> None:
    image = nib.load(path)
    moved = image.affine.copy()
    moved[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), moved), path)


BAD_DATA = {
    "image_without_label": (
        lambda r: _remove(r / "labelsTr" / "case_001.nii.gz"),
        "imagesTr/case_001_0000.nii.gz",
        "image without a label",
    ),
    "label_without_image": (
        lambda r: [_remove(r / "imagesTr" / f"case_001_000{c}.nii.gz") for c in (0, 1)],
        "labelsTr/case_001.nii.gz",
        "label without an image",
    ),
    "shape_mismatch": (
        lambda r: datasets.save(np.zeros((20, 22, 9), np.uint8), r / "labelsTr/case_000.nii.gz"),
        "labelsTr/case_000.nii.gz",
        "or affine differs from its image",
    ),
    "affine_mismatch": (
        lambda r: _save_shifted(r / "labelsTr" / "case_002.nii.gz"),
        "labelsTr/case_002.nii.gz",
        "or affine differs from its image",
    ),
    "channel_missing": (
        lambda r: _remove(r / "imagesTr" / "case_003_0001.nii.gz"),
        "imagesTr/case_003_0001.nii.gz",
        "missing: channel 1 of case 'case_003'",
    ),
    "undeclared_label_value": (
        lambda r: datasets.save(
            np.full(datasets.SHAPES[1], 5, np.uint8), r / "labelsTr" / "case_001.nii.gz"
        ),
        "labelsTr/case_001.nii.gz",
        "label values [5] are not declared",
    ),
    "nan_voxels": (
        lambda r: datasets.save(
            np.full(datasets.SHAPES[0], np.nan, np.float32), r / "imagesTr/case_000_0001.nii.gz"
        ),
        "imagesTr/case_000_0001.nii.gz",
        "NaN or infinite voxels",
    ),
    "inf_voxels": (
        lambda r: datasets.save(
            np.full(datasets.SHAPES[0], np.inf, np.float32), r / "imagesTr/case_000_0000.nii.gz"
        ),
        "imagesTr/case_000_0000.nii.gz",
        "NaN or infinite voxels",
    ),
    "truncated_file": (
        lambda r: _truncate(r / "imagesTr" / "case_002_0000.nii.gz"),
        "imagesTr/case_002_0000.nii.gz",
        "cannot be read as NIfTI",
    ),
    "not_gzip_at_all": (
        lambda r: (r / "labelsTr" / "case_002.nii.gz").write_bytes(gzip.compress(b"hello")),
        "labelsTr/case_002.nii.gz",
        "cannot be read as NIfTI",
    ),
    "2d_image": (
        lambda r: datasets.save(
            np.zeros((20, 22), np.float32), r / "imagesTr/case_000_0000.nii.gz"
        ),
        "imagesTr/case_000_0000.nii.gz",
        "expected a 3D volume",
    ),
    "4d_image": (
        lambda r: datasets.save(
            np.zeros((*datasets.SHAPES[0], 3), np.float32), r / "imagesTr/case_000_0000.nii.gz"
        ),
        "imagesTr/case_000_0000.nii.gz",
        "expected a 3D volume",
    ),
    "fewer_cases_than_folds": (
        lambda r: _rewrite_json(r, lambda m: None),  # valid data; the YAML asks for 5 folds
        "",
        "has 4 cases, fewer than the 5 folds",
    ),
    "malformed_dataset_json": (
        lambda r: (r / "dataset.json").write_text('{"channel_names": {"0": "T2"'),
        "dataset.json",
        "not valid JSON",
    ),
    "dataset_json_missing_key": (
        lambda r: _rewrite_json(r, lambda m: m.pop("file_ending")),
        "dataset.json",
        "missing required key 'file_ending'",
    ),
    "regions_without_their_order": (
        lambda r: _rewrite_json(r, lambda m: m["labels"].update(whole=[1, 2])),
        "dataset.json",
        "so regions_class_order is required",
    ),
    "wrong_num_training": (
        lambda r: _rewrite_json(r, lambda m: m.update(numTraining=7)),
        "dataset.json",
        "numTraining is 7 but labelsTr holds 4",
    ),
}


def _break(name: str, tmp_path: Path) -> tuple[Path, Path, str]:
    root = datasets.write_nnunet(tmp_path / "ds")
    change, culprit, message = BAD_DATA[name]
    change(root)
    return root, root / culprit if culprit else root, message


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_one_clear_error_naming_the_file(name, tmp_path):
    root, culprit, message = _break(name, tmp_path)
    n_folds = 5 if name == "fewer_cases_than_folds" else 2
    cfg = DataConfig(path=root, cache_dir=tmp_path / "cache", n_folds=n_folds)
    with pytest.raises(NasError) as info:
        split_dataset(load_dataset(cfg), cfg)
    assert info.value.source == str(culprit)
    assert message in info.value.reason
    if name != "fewer_cases_than_folds":  # that data is valid, and cached
        assert not list((tmp_path / "cache").glob("*/manifest.json"))  # nothing half-cached


def test_msd_path_leaving_the_dataset_folder_is_refused(tmp_path):
    root = datasets.write_msd(tmp_path / "ds")
    datasets.save(np.zeros(datasets.SHAPES[0], np.float32), tmp_path / "outside.nii.gz")
    _rewrite_json(root, lambda m: m["training"][0].update(image="../outside.nii.gz"))
    with pytest.raises(NasError, match="leaves the dataset folder") as info:
        _load(root, tmp_path / "cache")
    assert info.value.source == str(root / "dataset.json")


def test_pairs_without_a_mask_are_refused(tmp_path):
    root = datasets.write_pairs(tmp_path / "ds")
    (root / "masks" / "case_002.nii.gz").unlink()
    with pytest.raises(NasError, match="image without a mask") as info:
        _load(root, tmp_path / "cache")
    assert info.value.source == str(root / "images" / "case_002.nii.gz")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["label_without_image", "nan_voxels", "fewer_cases_than_folds"])
def test_bad_data_exits_2_and_writes_no_study(name, tmp_path):
    root, culprit, message = _break(name, tmp_path)
    folds = 5 if name == "fewer_cases_than_folds" else 2
    (tmp_path / "space.yaml").write_text(f"data:\n  path: {root}\n  n_folds: {folds}\n")
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {culprit}: ") and message in last_line
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("writer", "in_channels"),
    [(datasets.write_nnunet, 2), (datasets.write_msd, 2), (datasets.write_pairs, 1)],
)
def test_search_on_a_three_label_dataset_in_each_layout(tmp_path, writer, in_channels):
    root = writer(tmp_path / "ds")
    (tmp_path / "space.yaml").write_text(
        f"data:\n  path: {root}\n  n_folds: 2\n"
        "search:\n  spatial_dims: {type: categorical, choices: [2, 3]}\n  base_channels: 4\n"
        "  depth: 2\n"
        "train:\n  epochs: 1\n  batches_per_epoch: 2\n  patch_size_2d: [16, 16]\n"
        "  patch_size_3d: [16, 16, 8]\n  batch_size_3d: 1\n"
        "study:\n  name: multi\n  n_trials: 2\n  sampler: random\n"
    )
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(
        study_name="multi", storage=f"sqlite:///{tmp_path / 'results/multi/study.db'}"
    )
    assert len(study.trials) == 2
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert TrialRecord.of(trial).unet_config["in_channels"] == in_channels
        assert TrialRecord.of(trial).unet_config["out_channels"] == 3  # softmax over 0, 1, 2
        assert len(TrialRecord.of(trial).val_iou_per_class) == 2


def test_the_file_lock_keeps_a_second_process_out_until_it_is_released(tmp_path):
    lock = tmp_path / "results.lock"
    waiter = (
        "import sys, time; from pathlib import Path; from nas.core.locking import file_lock\n"
        "print('waiting', flush=True)\n"
        "with file_lock(Path(sys.argv[1])):\n"
        "    print(time.monotonic(), flush=True)\n"
    )
    with file_lock(lock):
        process = subprocess.Popen(
            [sys.executable, "-c", waiter, str(lock)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "waiting"
        time.sleep(0.5)  # time enough to take a lock that did not hold
        released = time.monotonic()
    entered = float(process.stdout.readline())
    assert process.wait(timeout=60) == 0
    assert entered >= released  # it got in only once this process let go


def test_nifti_files_by_case_name_refuse_two_files_of_one_name(tmp_path):
    """The one listing the pairs layout, the test split and nas.evaluate read folders with."""
    from nas.data.layouts import nifti_files

    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c.nii.gz").mkdir()  # a folder is not a file
    assert nifti_files(tmp_path) == {"a": tmp_path / "a.nii", "b": tmp_path / "b.nii.gz"}
    (tmp_path / "a.nii.gz").write_bytes(b"")
    with pytest.raises(NasError, match="gives the same case name 'a'"):
        nifti_files(tmp_path)
