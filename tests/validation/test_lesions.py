"""What lesion studies report (nas.validation.metrics): per-case Dice with nnU-Net's empty cases
left out,
lesion-wise detection from 26-connected components, volume and lesion-count differences, on
hand-made masks with known answers; and `python -m nas.evaluate` writing them from real NIfTI
files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nas.commands.evaluate import main
from nas.validation.metrics import case_dice_from_counts, lesion_metrics, mask_lesions

SHAPE = (20, 20, 20)


def box(start: tuple[int, ...], side: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + side) for s in start)] = True
    return mask


def test_two_lesions_one_found():
    reference = box((2, 2, 2), 4) | box((12, 12, 12), 4)  # 64 voxels each
    prediction = box((3, 3, 3), 4)  # overlaps the first by 27 voxels, misses the second
    lesions = mask_lesions(prediction, reference)
    assert (lesions.lesions_ref, lesions.lesions_pred) == (2, 1)
    assert (lesions.lesions_found, lesions.lesions_missed, lesions.false_lesions) == (1, 1, 0)
    assert lesions.lesion_recall == 0.5 and lesions.lesion_precision == 1.0
    assert lesions.lesion_f1 == pytest.approx(2 / 3)  # 2 TP / (2 TP + FP + FN)
    assert lesions.lesion_count_diff == 1
    assert lesions.case_dice == pytest.approx(2 * 27 / (64 + 128))
    assert (lesions.volume_diff, lesions.volume_unit) == (64.0, "voxels")  # no spacing given


def test_a_predicted_component_touching_no_lesion_is_a_false_positive():
    reference = box((2, 2, 2), 4) | box((12, 12, 12), 4)
    prediction = box((3, 3, 3), 4) | box((2, 14, 2), 3)  # the second touches no lesion
    lesions = mask_lesions(prediction, reference)
    assert (lesions.lesions_pred, lesions.lesions_found, lesions.false_lesions) == (2, 1, 1)
    assert lesions.lesion_precision == 0.5 and lesions.lesion_recall == 0.5
    assert lesions.lesion_f1 == pytest.approx(0.5)  # 2 / (2 + 1 + 1)
    assert lesions.lesion_count_diff == 0  # two against two, though only one matches
    # One predicted component spanning both lesions finds both, and is no false lesion.
    bridge = box((2, 2, 2), 14)
    spanning = mask_lesions(bridge, reference)
    assert (spanning.lesions_found, spanning.false_lesions, spanning.lesion_f1) == (2, 0, 1.0)


def test_lesions_are_26_connected_in_3d_and_8_connected_in_2d():
    corners = box((2, 2, 2), 3) | box((5, 5, 5), 3)  # they share one corner only
    assert mask_lesions(corners, corners).lesions_ref == 1
    apart = box((2, 2, 2), 3) | box((6, 5, 5), 3)  # one voxel of background between
    assert mask_lesions(apart, apart).lesions_ref == 2
    diagonal = np.eye(6, dtype=bool)  # 2D: a line of pixels touching at corners
    assert mask_lesions(diagonal, diagonal).lesions_ref == 1


def test_both_empty_has_no_dice_and_no_f1_and_is_left_out_of_the_mean():
    nothing = np.zeros(SHAPE, bool)
    empty = mask_lesions(nothing, nothing)
    assert math.isnan(empty.case_dice) and math.isnan(empty.lesion_f1)
    assert math.isnan(empty.lesion_precision) and math.isnan(empty.lesion_recall)
    assert (empty.lesions_ref, empty.lesion_count_diff, empty.volume_diff) == (0, 0, 0.0)
    # A prediction where there is nothing to find: precision 0, recall undefined, F1 0.
    invented = mask_lesions(box((2, 2, 2), 2), nothing)
    assert (invented.case_dice, invented.lesion_precision, invented.lesion_f1) == (0.0, 0.0, 0.0)
    assert math.isnan(invented.lesion_recall)
    # Per-case counts (cases, 3, K=1): Dice 1 and 0.5, and a case holding nothing, which
    # pooled Dice would count as perfect and the mean over cases leaves out.
    counts = [[[10], [10], [10]], [[5], [10], [10]], [[0], [0], [0]]]
    assert case_dice_from_counts(counts) == pytest.approx(0.75)
    assert case_dice_from_counts([[[0], [0], [0]]]) == 1.0  # nothing anywhere: as pooled


def test_case_dice_is_the_mean_over_classes_of_each_class_mean_over_cases():
    # Two classes: class 0 has Dice 1 and 0 in the two cases; class 1 is only in case 2 (0.5).
    counts = np.array([
        [[4, 0], [4, 0], [4, 0]],
        [[0, 2], [3, 4], [3, 4]],
    ], dtype=float)  # fmt: skip
    assert case_dice_from_counts(counts) == pytest.approx((0.5 + 0.5) / 2)
    # Leading axes (epochs, resamples) are kept: one call scores every resample.
    stacked = np.stack([counts, counts[[0, 0]], counts[[1, 1]]])
    assert case_dice_from_counts(stacked) == pytest.approx([0.5, 1.0, 0.25])


def test_volume_difference_in_ml_from_the_spacing():
    spacing = (2.0, 0.5, 1.5)  # 1.5 mm^3 a voxel
    lesions = mask_lesions(box((2, 2, 2), 4), box((2, 2, 2), 2), spacing)
    assert lesions.volume_unit == "ml"
    assert lesions.volume_diff == pytest.approx((64 - 8) * 1.5 / 1000)


def test_each_foreground_class_of_a_label_map_is_scored_and_a_binary_map_is_class_1():
    reference = box((2, 2, 2), 4).astype(np.uint8) + 2 * box((12, 12, 12), 4)
    prediction = 2 * box((13, 13, 13), 4).astype(np.uint8)  # class 1 missed, class 2 found
    per_class = lesion_metrics(prediction, reference, (1.0, 1.0, 1.0))
    assert list(per_class) == [1, 2]
    assert (per_class[1].lesion_recall, per_class[1].case_dice) == (0.0, 0.0)
    assert (per_class[2].lesion_f1, per_class[2].volume_unit) == (1.0, "ml")
    (binary,) = lesion_metrics(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)).values()
    assert math.isnan(binary.case_dice)  # class 1, though neither map holds it
    assert list(lesion_metrics(prediction, reference, classes=[2])) == [2]


# The command line, on real NIfTI files whose header gives the spacing.

SPACING_MM = (1.0, 2.0, 1.5)


def write_nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*SPACING_MM, 1.0])), path)


def test_evaluate_reports_case_dice_and_lesion_detection_per_case_and_over_cases(tmp_path, capsys):
    two = box((2, 2, 2), 4) | box((12, 12, 12), 4)
    cases = {
        # case: (prediction, label)
        "found_one": (box((2, 2, 2), 4), two),  # Dice 2/3, one of two lesions found
        "false_one": (two | box((2, 14, 2), 3), two),  # both found, one invented
        "healthy": (np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)),  # nothing, nothing said
    }
    for case, (prediction, label) in cases.items():
        write_nifti(tmp_path / "predictions" / f"{case}.nii.gz", prediction)
        write_nifti(tmp_path / "labels" / f"{case}.nii.gz", label)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    args = [str(tmp_path / "predictions"), str(tmp_path / "labels")]
    assert main([*args, "--dataset-json", str(tmp_path / "dataset.json")]) == 0

    table = pd.read_csv(tmp_path / "predictions" / "metrics.csv").set_index("case")
    assert table.loc["found_one", "case_dice"] == pytest.approx(2 / 3)
    assert table.loc["found_one", "lesion_f1"] == pytest.approx(2 / 3)
    assert table.loc["false_one", ["lesions_found", "false_lesions"]].tolist() == [2, 1]
    assert table.loc["false_one", "lesion_count_diff"] == 1
    assert table.loc["false_one", "volume_diff_ml"] == pytest.approx(27 * 3.0 / 1000)  # header
    assert np.isnan(table.loc["healthy", "case_dice"]) and table.loc["healthy", "dice"] == 1.0

    lesion = json.loads((tmp_path / "predictions" / "summary.json").read_text())["regions"]
    lesion = lesion["lesion"]
    # The healthy case has no case Dice: the mean is over the two others (pooled-per-case
    # Dice would count it as 1).
    false_dice = 2 * 128 / (128 + 155)
    assert lesion["case_dice"]["n"] == 2
    assert lesion["case_dice"]["mean"] == pytest.approx((2 / 3 + false_dice) / 2)
    assert lesion["dice"]["mean"] == pytest.approx((2 / 3 + false_dice + 1) / 3)
    assert lesion["lesion_f1"]["mean"] == pytest.approx((2 / 3 + 0.8) / 2)  # 4 / (4 + 1)
    assert lesion["lesions_pooled"] == {
        "found": 3, "missed": 1, "false": 1, "f1": pytest.approx(6 / 8),
    }  # fmt: skip
    out = capsys.readouterr().out
    assert "case_dice" in out and "lesion_f1" in out
