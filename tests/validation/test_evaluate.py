"""Segmentation metrics (nas.validation.metrics) against an independent computation on hand-made
masks,
and `python -m nas.evaluate` on real NIfTI files: what it writes, and the inputs it refuses."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from nas.commands.evaluate import main
from nas.validation.metrics import as_table, case_metrics, summarize

ANISOTROPIC_MM = (2.0, 0.7, 1.3)


def sphere(shape: tuple[int, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape) - (np.array(shape) - 1)[:, None, None, None] / 2
    return (grid**2).sum(axis=0) <= radius**2


def cube(shape: tuple[int, ...], start: tuple[int, ...], side: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + side) for s in start)] = True
    return mask


def reference_metrics(prediction: np.ndarray, reference: np.ndarray, spacing, tolerance_mm):
    """Dice, IoU, HD95 and NSD computed another way: surfaces by a 6-connected erosion, the
    distance from each surface voxel to the other surface by a Euclidean distance transform."""

    def surface(mask):
        inner = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1))
        return mask & ~inner

    def distances(source, target):  # from each voxel of surface `source` to surface `target`
        return ndimage.distance_transform_edt(~target, sampling=spacing)[source]

    both = np.count_nonzero(prediction & reference)
    n_pred, n_ref = np.count_nonzero(prediction), np.count_nonzero(reference)
    to_ref = distances(surface(prediction), surface(reference))
    to_pred = distances(surface(reference), surface(prediction))
    within = np.count_nonzero(to_ref <= tolerance_mm) + np.count_nonzero(to_pred <= tolerance_mm)
    return {
        "dice": 2 * both / (n_pred + n_ref),
        "iou": both / (n_pred + n_ref - both),
        # The larger of the two directed 95th percentiles, the definition MONAI uses.
        "hd95_mm": max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)),
        "nsd": within / (to_ref.size + to_pred.size),
    }


def assert_agrees(row, expected):
    for metric, value in expected.items():
        assert getattr(row, metric) == pytest.approx(value, rel=1e-5, abs=1e-6), metric


def test_concentric_spheres_agree_with_the_independent_computation():
    shape, spacing = (32, 32, 32), (1.0, 1.0, 1.0)
    inner, outer = sphere(shape, 6), sphere(shape, 9)
    (row,) = case_metrics("c", inner.astype(np.uint8), outer.astype(np.uint8), spacing, {"a": (1,)})
    assert_agrees(row, reference_metrics(inner, outer, spacing, 1.0))
    assert row.hd95_mm == pytest.approx(3.0, abs=1.0)  # the radius difference
    assert row.nsd < 0.2  # the surfaces are about 3 mm apart
    (loose,) = case_metrics("c", inner, outer, spacing, {"a": (1,)}, tolerance_mm=5.0)
    assert loose.nsd == 1.0


@pytest.mark.parametrize("shift", [(1, 0, 0), (1, 2, 0), (0, 1, 3)])
def test_a_shifted_cube_with_anisotropic_spacing_agrees_with_the_independent_computation(shift):
    shape = (20, 24, 20)
    reference = cube(shape, (5, 5, 5), 10)
    prediction = np.roll(reference, shift, axis=(0, 1, 2))
    label = 3 * reference.astype(np.int16)
    (row,) = case_metrics("c", 3 * prediction, label, ANISOTROPIC_MM, {"three": (3,)})
    assert_agrees(row, reference_metrics(prediction, reference, ANISOTROPIC_MM, 1.0))


def test_a_cube_shifted_one_voxel_along_its_2_mm_axis_is_2_mm_off():
    shape = (20, 20, 20)
    reference = cube(shape, (5, 5, 5), 10)
    prediction = np.roll(reference, 1, axis=0)
    (row,) = case_metrics("c", prediction, reference, ANISOTROPIC_MM, {"a": (1,)})
    assert row.hd95_mm == pytest.approx(2.0)  # a whole face is exactly one 2 mm voxel away
    assert row.dice == pytest.approx(0.9)  # 9 of 10 slices overlap
    assert row.iou == pytest.approx(9 / 11)
    assert row.nsd < 1.0  # one voxel, but 2 mm: outside a 1 mm tolerance
    (within,) = case_metrics("c", prediction, reference, ANISOTROPIC_MM, {"a": (1,)}, 2.0)
    assert within.nsd == 1.0
    voxel_ml = math.prod(ANISOTROPIC_MM) / 1000
    assert row.volume_ref_ml == pytest.approx(1000 * voxel_ml)
    assert row.volume_pred_ml == pytest.approx(1000 * voxel_ml)
    assert row.volume_diff_ml == 0.0


def test_a_region_is_the_union_of_its_label_values():
    shape = (16, 16, 16)
    reference = cube(shape, (2, 2, 2), 5) * 1 + cube(shape, (9, 9, 9), 5) * 2
    swapped = np.where(reference == 1, 2, np.where(reference == 2, 1, 0))
    regions = {"one": (1,), "two": (2,), "either": (1, 2)}
    one, two, either = case_metrics("c", swapped, reference, (1.0, 1.0, 1.0), regions)
    assert (one.region, two.region, either.region) == ("one", "two", "either")
    assert one.dice == two.dice == 0.0
    assert either.dice == 1.0 and either.hd95_mm == 0.0 and either.nsd == 1.0


@pytest.mark.parametrize("empty", ["prediction", "reference"])
def test_one_empty_mask_scores_zero_and_the_image_diagonal(empty):
    shape = (20, 20, 20)
    mask, nothing = cube(shape, (5, 5, 5), 4), np.zeros(shape, bool)
    prediction, reference = (nothing, mask) if empty == "prediction" else (mask, nothing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "all 0, this may result in nan" noise either
        (row,) = case_metrics("c", prediction, reference, ANISOTROPIC_MM, {"a": (1,)})
    assert (row.dice, row.iou, row.nsd) == (0.0, 0.0, 0.0)
    assert row.hd95_mm == pytest.approx(math.hypot(40.0, 14.0, 26.0))  # 20 voxels per axis
    volume_ml = 64 * math.prod(ANISOTROPIC_MM) / 1000
    assert row.volume_diff_ml == pytest.approx(volume_ml)
    assert (row.volume_pred_ml, row.volume_ref_ml) == (
        (0.0, pytest.approx(volume_ml))
        if empty == "prediction"
        else (pytest.approx(volume_ml), 0.0)
    )


def test_two_empty_masks_agree_perfectly():
    nothing = np.zeros((8, 8, 8), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (row,) = case_metrics("c", nothing, nothing, ANISOTROPIC_MM, {"a": (1,)})
    assert (row.dice, row.iou, row.nsd, row.hd95_mm) == (1.0, 1.0, 1.0, 0.0)
    assert row.volume_pred_ml == row.volume_ref_ml == row.volume_diff_ml == 0.0


def test_summarize_gives_mean_median_and_sample_sd_per_region():
    shape = (12, 12, 12)
    reference = cube(shape, (3, 3, 3), 6)
    regions = {"a": (1,), "b": (2,)}
    rows = [
        *case_metrics("x", reference, reference, (1, 1, 1), regions),
        *case_metrics("y", np.zeros(shape, bool), reference, (1, 1, 1), regions),
        *case_metrics("z", np.roll(reference, 3, axis=0), reference, (1, 1, 1), regions),
    ]
    summary = summarize(as_table(rows))
    assert list(summary) == ["a", "b"]
    dice = [1.0, 0.0, 0.5]
    assert summary["a"]["n"] == 3
    assert summary["a"]["dice"] == pytest.approx(
        {"mean": 0.5, "median": 0.5, "sd": float(np.std(dice, ddof=1))}
    )
    assert summary["b"]["dice"] == {"mean": 1.0, "median": 1.0, "sd": 0.0}
    single = summarize(as_table(rows[:2]))
    assert single["a"]["dice"]["sd"] is None  # one case has no spread


# The command line, on real NIfTI files.

AFFINE = np.diag([*ANISOTROPIC_MM, 1.0])
AFFINE[:3, 3] = (-10.0, 4.0, 7.5)
SHAPE = (16, 18, 14)
DATASET_JSON = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "lesion": 1, "organ": 2, "either": [1, 2]},
    "file_ending": ".nii.gz",
}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def two_classes() -> np.ndarray:
    return (1 * cube(SHAPE, (2, 2, 2), 5) + 2 * cube(SHAPE, (8, 9, 6), 6)).astype(np.uint8)


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path, Path]:
    """Predictions and labels of two cases, and a dataset.json with a region: case `same` is
    predicted perfectly, case `swapped` with its two classes exchanged."""
    label = two_classes()
    swapped = np.where(label == 1, 2, np.where(label == 2, 1, 0)).astype(np.uint8)
    for case, prediction in (("same", label), ("swapped", swapped)):
        write_nifti(tmp_path / "labels" / f"{case}.nii.gz", label)
        write_nifti(tmp_path / "predictions" / f"{case}.nii.gz", prediction)
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps(DATASET_JSON))
    return tmp_path / "predictions", tmp_path / "labels", dataset_json


def test_the_cli_writes_metrics_and_summary_beside_the_predictions(folders, capsys):
    predictions, labels, dataset_json = folders
    assert main([str(predictions), str(labels), "--dataset-json", str(dataset_json)]) == 0
    table = pd.read_csv(predictions / "metrics.csv")
    assert list(table.columns) == [
        "case", "region", "dice", "iou", "hd95_mm", "nsd",
        "volume_pred_ml", "volume_ref_ml", "volume_diff_ml",
        # What lesion studies report (test_lesions.py), after the columns of before.
        "case_dice", "lesion_f1", "lesion_precision", "lesion_recall", "lesions_ref",
        "lesions_pred", "lesions_found", "false_lesions", "lesion_count_diff",
    ]  # fmt: skip
    assert list(zip(table.case, table.region, table.dice, strict=True)) == [
        ("same", "lesion", 1.0), ("same", "organ", 1.0), ("same", "either", 1.0),
        ("swapped", "lesion", 0.0), ("swapped", "organ", 0.0), ("swapped", "either", 1.0),
    ]  # fmt: skip
    swapped_organ = table[(table.case == "swapped") & (table.region == "organ")].iloc[0]
    voxel_ml = math.prod(ANISOTROPIC_MM) / 1000
    assert swapped_organ.volume_ref_ml == pytest.approx(216 * voxel_ml)  # spacing from header
    assert swapped_organ.volume_pred_ml == pytest.approx(125 * voxel_ml)

    summary = json.loads((predictions / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["tolerance_mm"] == 1.0
    assert list(summary["regions"]) == ["lesion", "organ", "either"]
    assert summary["regions"]["either"]["label_values"] == [1, 2]
    lesion = summary["regions"]["lesion"]
    assert lesion["n"] == 2
    assert lesion["dice"] == pytest.approx({"mean": 0.5, "median": 0.5, "sd": math.sqrt(0.5)})

    out = capsys.readouterr().out
    assert "lesion" in out and "0.500 ± 0.707" in out
    assert f"wrote metrics.csv and summary.json to {predictions}" in out


def test_without_dataset_json_each_value_found_is_a_region(tmp_path, capsys):
    label = two_classes()
    write_nifti(tmp_path / "labels" / "a.nii.gz", label)
    write_nifti(tmp_path / "predictions" / "a.nii.gz", label)
    only_one = np.where(label == 2, 0, label).astype(np.uint8)
    write_nifti(tmp_path / "labels" / "b.nii", only_one)  # .nii and .nii.gz mix
    write_nifti(tmp_path / "predictions" / "b.nii.gz", only_one)
    write_nifti(tmp_path / "predictions" / "stray.nii.gz", label)  # no label: ignored
    out = tmp_path / "scores"
    assert main([str(tmp_path / "predictions"), str(tmp_path / "labels"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "metrics.csv", dtype={"region": str})
    assert list(zip(table.case, table.region, strict=True)) == [
        ("a", "1"),
        ("a", "2"),
        ("b", "1"),
        ("b", "2"),
    ]
    # Case b holds no 2 at all: a region both leave empty, a perfect score.
    b2 = table.iloc[3]
    assert (b2.dice, b2.hd95_mm, b2.nsd, b2.volume_ref_ml) == (1.0, 0.0, 1.0, 0.0)
    assert not (tmp_path / "predictions" / "metrics.csv").exists()
    assert "ignoring a prediction without a label (stray.nii.gz)" in capsys.readouterr().err


def test_two_single_files_are_one_case(tmp_path):
    reference = cube(SHAPE, (4, 4, 4), 6).astype(np.uint8)
    label = write_nifti(tmp_path / "ref" / "case.nii.gz", reference)
    prediction = write_nifti(tmp_path / "pred" / "mine.nii.gz", np.roll(reference, 1, axis=0))
    assert main([str(prediction), str(label), "--tolerance-mm", "2"]) == 0
    table = pd.read_csv(tmp_path / "pred" / "metrics.csv")
    assert list(table.case) == ["case"]
    assert table.hd95_mm[0] == pytest.approx(2.0) and table.nsd[0] == 1.0
    assert json.loads((tmp_path / "pred" / "summary.json").read_text())["tolerance_mm"] == 2.0


def _shifted_affine() -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] += 0.5
    return affine


# name -> (damage to the `folders` fixture, the file the error names, part of its reason)
BAD_INPUTS = {
    "shape": (
        lambda p, lab, j: write_nifti(p / "same.nii.gz", np.zeros((16, 18, 13), np.uint8)),
        "predictions/same.nii.gz",
        "differs from (16, 18, 14)",
    ),
    "affine": (
        lambda p, lab, j: write_nifti(p / "same.nii.gz", two_classes(), _shifted_affine()),
        "predictions/same.nii.gz",
        "affine differs",
    ),
    "missing_prediction": (
        lambda p, lab, j: (p / "swapped.nii.gz").unlink(),
        "predictions/swapped.nii.gz",
        "not found: the prediction for",
    ),
    "undeclared_label_value": (
        lambda p, lab, j: write_nifti(lab / "swapped.nii.gz", two_classes() * 2),
        "labels/swapped.nii.gz",
        "label value 4, which dataset.json does not declare",
    ),
    "undeclared_predicted_value": (
        lambda p, lab, j: write_nifti(p / "swapped.nii.gz", two_classes() + 5),
        "predictions/swapped.nii.gz",
        "label value 5",
    ),
    "fractional_mask": (
        lambda p, lab, j: write_nifti(p / "same.nii.gz", two_classes() * np.float32(0.5)),
        "predictions/same.nii.gz",
        "expected integers",
    ),
    "corrupt_prediction": (
        lambda p, lab, j: (p / "same.nii.gz").write_bytes(b"not a NIfTI file"),
        "predictions/same.nii.gz",
        "cannot be read as NIfTI",
    ),
    "truncated_label": (
        lambda p, lab, j: (lab / "same.nii.gz").write_bytes(
            (lab / "same.nii.gz").read_bytes()[:-40]  # the end of the compressed voxels
        ),
        "labels/same.nii.gz",
        "cannot be read as NIfTI",
    ),
    "no_labels_folder": (
        lambda p, lab, j: [path.unlink() for path in lab.iterdir()] and lab.rmdir(),
        "labels",
        "not found",
    ),
    "bad_dataset_json": (
        lambda p, lab, j: j.write_text(json.dumps({"labels": {"lesion": "one"}})),
        "dataset.json",
        "must be a non-negative integer",
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_a_bad_input_is_one_line_naming_the_file_and_nothing_is_written(folders, capsys, bad):
    predictions, labels, dataset_json = folders
    damage, named, reason = BAD_INPUTS[bad]
    damage(predictions, labels, dataset_json)
    before = sorted(predictions.iterdir())
    code = main([str(predictions), str(labels), "--dataset-json", str(dataset_json)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"error: {predictions.parent / named}: "), captured.err
    assert reason in captured.err
    assert captured.err.count("\n") == 1
    assert sorted(predictions.iterdir()) == before  # no metrics.csv, summary.json or leftovers


def test_validation_postprocessing_and_evaluate_score_one_dice():
    """Dice is defined once (nas.validation.metrics): validation's pooled scores of one case, the
    postprocessing's per-case Dice and nas.evaluate's agree on the same two-class masks."""
    from nas.data.labels import LabelScheme
    from nas.validation.postprocess import dice_per_class
    from nas.validation.validate import PooledCounts

    shape = (16, 16, 16)
    reference = cube(shape, (2, 2, 2), 6) * 1 + cube(shape, (9, 9, 9), 5) * 2
    prediction = cube(shape, (3, 2, 2), 6) * 1 + cube(shape, (9, 9, 8), 4) * 2
    rows = case_metrics("c", prediction, reference, (1.0, 1.0, 1.0), {"a": (1,), "b": (2,)})
    per_class = dice_per_class(prediction, reference, 2)
    counts = PooledCounts(LabelScheme.build({0: 0, 1: 1, 2: 2}, ("a", "b")))
    counts.add(prediction, reference)
    scores = counts.scores()
    assert per_class == pytest.approx([row.dice for row in rows])
    assert scores.dice == pytest.approx(np.mean(per_class))
    assert scores.iou_per_class == pytest.approx(tuple(row.iou for row in rows))
    # 5 of 6 slabs of class a's cube overlap: Dice 5/6, IoU 5/7.
    assert per_class[0] == pytest.approx(5 / 6) and rows[0].iou == pytest.approx(5 / 7)
