"""Held-out test scores: a tiny search on an nnU-Net dataset with imagesTs/ + labelsTs/, its
front scored on the test cases as an exported model would segment them, and the test split
checked as strictly as the training cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from nas.core.errors import NasError
from nas.data import DataConfig, load_dataset
from nas.data.test_split import find_test_split
from nas.evaluation.heldout import score_trials
from nas.search.record import StudyRecord, write_study
from nas.search.report import HELD_OUT
from nas.search.results import pareto_front
from nas.search.weights import checkpoint_path
from nas.validation.validate import Scores
from tests.conftest import run_cli
from tests.datasets import SHAPES, make_case, save, write_nnunet

# Trains in a few seconds; its 2D networks learn these lesions well enough to score
# clearly above zero, so the comparison below is between real masks.
SPACE = """\
data:
  path: Dataset003_Heldout
  foreground: {lesion: [1, 2]}
  n_folds: 2
search:
  spatial_dims: 2
  depth: {type: int, low: 1, high: 2}
  base_channels: {type: categorical, choices: [4, 8]}
train:
  epochs: 2
  batches_per_epoch: 6
  batch_size_2d: 8
  patch_size_2d: [24, 24]
  learning_rate: 1.0e-2
study:
  name: held
  sampler: random
  n_trials: 2
  seed: 0
  pruner: {type: none}
"""


def write_test_cases(folder: Path, numbers=(10, 11)) -> Path:
    """imagesTs/ + labelsTs/ in `folder`, cases unlike any training case."""
    for i in numbers:
        channels, label = make_case(i, SHAPES[i % len(SHAPES)])
        for c, channel in enumerate(channels):
            save(channel, folder / "imagesTs" / f"test_{i:03d}_{c:04d}.nii.gz")
        save(label, folder / "labelsTs" / f"test_{i:03d}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """A finished search on a dataset with a test split: nas.run scores its front on the
    test cases after the search and writes the scores into results/."""
    root = tmp_path_factory.mktemp("heldout")
    write_test_cases(write_nnunet(root / "Dataset003_Heldout"))
    (root / "space.yaml").write_text(SPACE)
    result = run_cli("nas.run", "space.yaml", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "held-out test case(s)" in result.stdout
    data = DataConfig(path=root / "Dataset003_Heldout", foreground={"lesion": (1, 2)}, n_folds=2)
    split = find_test_split(data, load_dataset(data))
    assert [case.name for case in split.cases] == ["test_010", "test_011"]
    return root


def _study(root: Path) -> optuna.Study:
    storage = f"sqlite:///{root / 'results' / 'held' / 'study.db'}"
    return optuna.load_study(study_name="held", storage=storage)


def _pooled_iou_dice(masks: Path, labels: Path) -> tuple[float, float]:
    """Lesion (label 1 or 2) IoU and Dice pooled over the cases, from NIfTI masks."""
    intersection = predicted = truth = 0
    for label_file in sorted(labels.iterdir()):
        t = np.asarray(nib.load(label_file).dataobj) > 0
        p = np.asarray(nib.load(masks / label_file.name).dataobj) > 0
        intersection += (p & t).sum()
        predicted += p.sum()
        truth += t.sum()
    return intersection / (predicted + truth - intersection), 2 * intersection / (predicted + truth)


@pytest.mark.slow
def test_front_members_get_the_scores_of_their_exported_model(searched):
    pareto = pd.read_csv(searched / "results" / "held" / "pareto.csv")
    trials = pd.read_csv(searched / "results" / "held" / "trials.csv")
    assert pareto.test_iou.notna().all() and pareto.test_dice.notna().all()
    assert trials[~trials.number.isin(pareto.number)].test_iou.isna().all()
    for row in pareto.itertuples():
        # What a user gets: export the trial, predict the test scans, compare the masks.
        model = f"model_{row.number}"
        exported = ("results/held", "--trial", str(row.number), "--format", "none", "--out", model)
        assert run_cli("nas.export", *exported, cwd=searched).returncode == 0
        masks = f"masks_{row.number}"
        images = "Dataset003_Heldout/imagesTs"
        assert run_cli("nas.predict", model, images, masks, cwd=searched).returncode == 0
        iou, dice = _pooled_iou_dice(searched / masks, searched / "Dataset003_Heldout/labelsTs")
        assert row.test_iou == pytest.approx(iou, abs=1e-9)
        assert row.test_dice == pytest.approx(dice, abs=1e-9)
    assert pareto.test_iou.max() > 0.2  # real masks, not an empty prediction
    report = (searched / "results" / "held" / "report.html").read_text()
    assert HELD_OUT in report


@pytest.mark.slow
def test_an_unchanged_trial_is_not_scored_again(searched, monkeypatch):
    study = _study(searched)
    study_dir = searched / "results" / "held"
    front = pareto_front(study)
    stored = StudyRecord.of(study).test_scores
    scored = []

    def fake_score(study, trial, weights, split, device, study_dir=None):
        scored.append(trial.number)
        return Scores(0.5, 0.6, (0.5,))

    monkeypatch.setattr("nas.evaluation.heldout.score_trial", fake_score)
    data = DataConfig(path=searched / "Dataset003_Heldout", foreground={"lesion": (1, 2)})
    split = find_test_split(data, load_dataset(data))
    again = score_trials(study, study_dir, front, split, torch.device("cpu"))
    assert scored == []
    assert again == {
        t.number: {k: stored[str(t.number)][k] for k in ("test_iou", "test_dice")} for t in front
    }

    # A trial without weights (off the front, or never saved) is left out, without an error.
    weights = checkpoint_path(study_dir, front[0].number)
    weights.rename(weights.with_suffix(".away"))
    try:
        without = score_trials(study, study_dir, front, split, torch.device("cpu"))
    finally:
        weights.with_suffix(".away").rename(weights)
    assert front[0].number not in without and scored == []

    changed = front[0].number
    weights = checkpoint_path(study_dir, changed)
    backup = weights.read_bytes()
    state = torch.load(weights, weights_only=True)
    torch.save({k: v + 0.01 for k, v in state.items()}, weights)
    try:
        rescored = score_trials(study, study_dir, front, split, torch.device("cpu"))
    finally:
        weights.write_bytes(backup)
        write_study(study, test_scores=stored)
    assert scored == [changed]
    assert rescored[changed] == {"test_iou": 0.5, "test_dice": 0.6}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """An nnU-Net dataset with no test split, loaded as the search loads it."""
    root = write_nnunet(tmp_path_factory.mktemp("plain") / "Dataset004_Plain")
    data = DataConfig(path=root)
    return data, load_dataset(data)


def test_a_dataset_without_test_labels_has_no_test_split(plain, tmp_path):
    data, dataset = plain
    assert find_test_split(data, dataset) is None
    (dataset.root / "imagesTs").mkdir()  # nnU-Net's usual unlabelled test images
    try:
        assert find_test_split(data, dataset) is None
    finally:
        (dataset.root / "imagesTs").rmdir()


def test_data_test_names_a_test_folder_relative_to_the_working_directory(
    plain, tmp_path, monkeypatch
):
    _, dataset = plain
    write_test_cases(tmp_path / "elsewhere", numbers=(12,))
    monkeypatch.chdir(tmp_path)
    data = DataConfig(path=dataset.root, test=Path("elsewhere"))
    assert "test" not in data.to_dict()  # the test split is no part of the study's data
    split = find_test_split(data, dataset)
    assert [c.name for c in split.cases] == ["test_012"]
    assert split.class_of_value == {0: 0, 1: 1, 2: 2} and split.scheme.n_classes == 2


def _relabel(path: Path, value: int) -> None:
    image = nib.load(path)
    label = np.asarray(image.dataobj).copy()
    label[label == 2] = value
    nib.save(nib.Nifti1Image(label, image.affine), path)


def _crop(path: Path) -> None:
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-1], image.affine), path)


BAD_TEST_SPLITS = {
    "undeclared_label_value": (
        lambda f: _relabel(f / "labelsTs" / "test_011.nii.gz", 3),
        "labelsTs/test_011.nii.gz",
        "label values [3] are not declared in dataset.json (0, 1, 2)",
    ),
    "image_without_label": (
        lambda f: (f / "labelsTs" / "test_010.nii.gz").unlink(),
        "imagesTs/test_010_0000.nii.gz",
        "test image without a label",
    ),
    "label_without_image": (
        lambda f: [(f / "imagesTs" / f"test_010_000{c}.nii.gz").unlink() for c in (0, 1)],
        "labelsTs/test_010.nii.gz",
        "test label without an image",
    ),
    "shape_mismatch": (
        lambda f: _crop(f / "labelsTs" / "test_011.nii.gz"),
        "labelsTs/test_011.nii.gz",
        "differs from its image",
    ),
    "missing_channel": (
        lambda f: (f / "imagesTs" / "test_011_0001.nii.gz").unlink(),
        "imagesTs/test_011_0000.nii.gz",
        "has channel files [0]",
    ),
    "no_labels_folder": (
        lambda f: shutil.rmtree(f / "labelsTs"),
        "labelsTs",
        "a test folder holds imagesTs/ and labelsTs/",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TEST_SPLITS))
def test_a_bad_test_split_is_one_error_naming_the_file(plain, tmp_path, case):
    _, dataset = plain
    damage, path, reason = BAD_TEST_SPLITS[case]
    folder = write_test_cases(tmp_path / "test")
    damage(folder)
    with pytest.raises(NasError) as error:
        find_test_split(DataConfig(path=dataset.root, test=folder), dataset)
    assert str(error.value).startswith(str(folder / path)), str(error.value)
    assert reason in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_the_test_split_is_never_used_by_the_search(searched):
    """Its cases are in neither the training nor the validation cases the study records."""
    cases = StudyRecord.of(_study(searched)).data_cases
    assert not {"test_010", "test_011"} & {*cases["train"], *cases["validation"]}
