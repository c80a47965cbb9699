"""From a search to a shipped model along nnU-Net's path: two members cross-validated, their
ensemble scored out of fold, chosen by cross-validation, exported as one folder, predicted
with saved probabilities, ensembled again from those and evaluated against the labels."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from nas.evaluation.member_ensemble import candidate_ensembles
from nas.search.record import StudyRecord, write_study
from tests.conftest import run_cli, user_error
from tests.datasets import write_nnunet

from .test_heldout import SPACE, write_test_cases

pytestmark = pytest.mark.slow


def _crossval(root: Path) -> optuna.Study:
    storage = f"sqlite:///{root / 'results' / 'held' / 'study.db'}"
    return optuna.load_study(study_name="held-crossval", storage=storage)


@pytest.fixture(scope="module")
def two_members(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("members")
    write_test_cases(write_nnunet(root / "Dataset003_Heldout"))
    (root / "space.yaml").write_text(SPACE)
    assert run_cli("nas.run", "space.yaml", cwd=root).returncode == 0
    result = run_cli(
        "nas.retrain", "results/held", "--trials", "0,1", "--folds", "all", "--epochs", "1",
        cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root


def test_candidates_are_each_member_and_the_best_two_and_three():
    assert candidate_ensembles([7, 3, 9, 1]) == [(7,), (3,), (9,), (1,), (7, 3), (7, 3, 9)]
    assert candidate_ensembles([5]) == [(5,)]


def test_members_and_their_ensemble_are_scored_out_of_fold_and_the_best_chosen(two_members):
    table = pd.read_csv(two_members / "results/held/member_ensembles.csv", dtype={"members": str})
    cv = pd.read_csv(two_members / "results/held/crossval.csv")
    best_first = [str(n) for n in cv.sort_values("cv_iou_mean", ascending=False).trial]
    assert list(table.members) == [*best_first, " + ".join(best_first)]
    assert list(table.n_members) == [1, 1, 2]
    assert table.oof_iou.between(0, 1).all()
    chosen = StudyRecord.of(_crossval(two_members)).member_ensembles["chosen"]
    assert chosen["oof_iou"] == pytest.approx(table.oof_iou.max())


def test_an_ensemble_of_two_members_is_exported_predicted_ensembled_and_evaluated(
    two_members, tmp_path
):
    root = tmp_path / "study"
    shutil.copytree(two_members, root)
    crossval = _crossval(root)
    stored = StudyRecord.of(crossval).member_ensembles
    pair = next(row for row in stored["rows"] if row["n_members"] == 2)
    # Whichever won out of fold on these tiny runs, the pair is what this path exports.
    write_study(crossval, member_ensembles=stored | {"chosen": pair})
    model = tmp_path / "ensemble"
    result = run_cli("nas.export", "results/held", "--ensemble", "members", "--format", "none",
                     "--out", str(model), cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr
    card = yaml.safe_load((model / "ensemble.yaml").read_text())
    assert sorted(card["members"]) == ["trial_0000", "trial_0001"]  # the better one first
    assert card["members"] == [f"trial_{int(n):04d}" for n in pair["members"].split(" + ")]
    assert sorted(card["source"]["trials"]) == [0, 1]
    for member in card["members"]:
        member_card = yaml.safe_load((model / member / "architecture.yaml").read_text())
        assert member_card["source"]["weights"]["kind"] == "folds"  # nothing else trained them

    images = root / "Dataset003_Heldout" / "imagesTs"
    masks = tmp_path / "masks"
    result = run_cli("nas.predict", str(model), str(images), str(masks), "--save-probabilities",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Each member alone, its probabilities saved; their mean labels the ensemble's masks.
    for member in card["members"]:
        result = run_cli("nas.predict", str(model / member), str(images),
                         str(tmp_path / member), "--save-probabilities", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr
    cases = sorted(p.stem for p in masks.glob("*.npz"))
    assert cases == ["test_010", "test_011"]
    for case in cases:
        mask = nib.load(masks / f"{case}.nii.gz")
        image = nib.load(images / f"{case}_0000.nii.gz")
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine)
        mean = np.mean(
            [np.load(tmp_path / m / f"{case}.npz")["probabilities"] for m in card["members"]], 0
        )
        np.testing.assert_allclose(np.load(masks / f"{case}.npz")["probabilities"], mean, atol=1e-6)
        if not pair["largest_component"]:
            np.testing.assert_array_equal(np.asarray(mask.dataobj) > 0, mean[0] > 0.5)
    # nas ensemble over the members' saved probabilities gives the same masks.
    again = tmp_path / "again"
    members = [str(tmp_path / m) for m in card["members"]]
    assert run_cli("nas.ensemble", *members, str(again), cwd=tmp_path).returncode == 0
    if not pair["largest_component"]:
        for case in cases:
            np.testing.assert_array_equal(
                np.asarray(nib.load(again / f"{case}.nii.gz").dataobj),
                np.asarray(nib.load(masks / f"{case}.nii.gz").dataobj),
            )
    labels = root / "Dataset003_Heldout" / "labelsTs"
    dataset_json = root / "Dataset003_Heldout" / "dataset.json"
    result = run_cli("nas.evaluate", str(masks), str(labels), "--dataset-json", str(dataset_json),
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (masks / "metrics.csv").is_file()


def test_member_ensembles_that_cannot_be_made_are_refused(two_members, tmp_path):
    root = tmp_path / "study"
    shutil.copytree(two_members, root)
    crossval = _crossval(root)
    stored = StudyRecord.of(crossval).member_ensembles
    single = next(row for row in stored["rows"] if row["n_members"] == 1)
    write_study(crossval, member_ensembles=stored | {"chosen": single})
    assert "alone beat every ensemble; export it with --trial" in user_error(
        run_cli("nas.export", "results/held", "--ensemble", "members", cwd=root)
    )
    write_study(crossval, member_ensembles={})
    assert "has no ensemble chosen out of fold: run nas retrain" in user_error(
        run_cli("nas.export", "results/held", "--ensemble", "members", cwd=root)
    )
    # An ensemble folder whose members give other labels.
    pair = next(row for row in stored["rows"] if row["n_members"] == 2)
    write_study(crossval, member_ensembles=stored | {"chosen": pair})
    model = tmp_path / "ensemble"
    assert run_cli("nas.export", "results/held", "--ensemble", "members", "--format", "none",
                   "--out", str(model), cwd=root).returncode == 0  # fmt: skip
    first, second = yaml.safe_load((model / "ensemble.yaml").read_text())["members"]
    member_card = model / second / "architecture.yaml"
    card = yaml.safe_load(member_card.read_text())
    member_card.write_text(yaml.safe_dump({**card, "labels": {"background": 0, "other": 1}}))
    images = root / "Dataset003_Heldout" / "imagesTs"
    assert f"gives other labels than {first}" in user_error(
        run_cli("nas.predict", str(model), str(images), str(tmp_path / "m"), cwd=tmp_path)
    )
    assert not (tmp_path / "m").exists()
