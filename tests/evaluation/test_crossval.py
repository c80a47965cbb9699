"""Cross-validated front members, fold ensembles with mirroring, and postprocessing: a tiny
search on an nnU-Net dataset with held-out cases, cross-validated on both folds, exported as
an ensemble and used by nas.commands.predict."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml

from nas.commands.cli import exit_code
from nas.evaluation import crossval
from nas.network.inference import mirror_axes, predictor
from nas.network.model_card import read_card
from nas.search.record import TrialRecord
from nas.training.fit import CandidateFailed
from nas.validation.postprocess import classes_helped, keep_largest_component
from tests.conftest import run_cli, user_error
from tests.datasets import write_nnunet

from .test_heldout import SPACE, write_test_cases

ONE_TRIAL = SPACE.replace("n_trials: 2", "n_trials: 1")


def _study(root: Path, name: str) -> optuna.Study:
    storage = f"sqlite:///{root / 'results' / 'held' / 'study.db'}"
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def crossvalidated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crossval")
    write_test_cases(write_nnunet(root / "Dataset003_Heldout"))
    (root / "space.yaml").write_text(ONE_TRIAL)
    assert run_cli("nas.run", "space.yaml", cwd=root).returncode == 0
    result = run_cli(
        "nas.retrain",
        "results/held",
        "--folds",
        "all",
        "--epochs",
        "1",
        "--workers",
        "2",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return root


def _pooled_dice(masks: Path, labels: Path) -> float:
    intersection = total = 0
    for label_file in sorted(labels.iterdir()):
        t = np.asarray(nib.load(label_file).dataobj) > 0
        p = np.asarray(nib.load(masks / label_file.name).dataobj) > 0
        intersection += (p & t).sum()
        total += p.sum() + t.sum()
    return 2 * intersection / total


@pytest.mark.slow
def test_every_fold_is_recorded_apart_from_the_search_and_summarised(crossvalidated):
    root = crossvalidated
    search = _study(root, "held")
    (member,) = search.trials
    runs = _study(root, "held-crossval").trials
    assert sorted(TrialRecord.of(t).fold for t in runs) == [0, 1]
    assert {TrialRecord.of(t).source_trial for t in runs} == {member.number}
    assert all(t.values[1] == member.values[1] for t in runs)  # the same network
    for fold in (0, 1):
        assert (root / f"results/held/crossval/trial_{member.number:04d}/fold_{fold}.pt").is_file()
    row = pd.read_csv(root / "results/held/crossval.csv").iloc[0]
    ious = [t.values[0] for t in runs]
    assert row.cv_iou_mean == pytest.approx(np.mean(ious))
    assert row.cv_iou_sd == pytest.approx(np.std(ious, ddof=1))
    assert row.search_val_iou == pytest.approx(member.values[0])
    # Every validation case of both folds, out of fold, without and with postprocessing.
    cases = [c["case"] for t in runs for c in TrialRecord.of(t).out_of_fold]
    assert sorted(cases) == [f"case_{i:03d}" for i in range(4)]

    again = run_cli("nas.retrain", "results/held", "--folds", "0,1", "--epochs", "1", cwd=root)
    assert again.returncode == 0, again.stderr
    assert "training" not in again.stdout  # both folds were done: nothing trains again
    assert len(_study(root, "held-crossval").trials) == 2


@pytest.mark.slow
def test_the_ensemble_is_scored_on_held_out_cases_as_predict_segments_them(crossvalidated):
    root = crossvalidated
    table = pd.read_csv(root / "results/held/ensemble.csv").set_index("variant")
    assert list(table.index) == ["single", "ensemble", "ensemble + mirror"]
    assert list(table.members) == [1, 2, 2]
    assert list(table.passes_per_window) == [1, 2, 2 * 4]  # 2D: four flips of a slice

    export = run_cli(
        "nas.export", "results/held", "--ensemble", "folds", "--format", "none", cwd=root
    )
    assert export.returncode == 0, export.stderr
    (folder,) = (root / "results/held/export").iterdir()
    card = read_card(folder)
    assert card.members == ("fold_0", "fold_1") and card.inference.tta == "none"
    masks = root / "masks"
    images = "Dataset003_Heldout/imagesTs"
    assert run_cli("nas.predict", str(folder), images, str(masks), cwd=root).returncode == 0
    labels = root / "Dataset003_Heldout/labelsTs"
    assert _pooled_dice(masks, labels) == pytest.approx(table.loc["ensemble"].test_dice)
    # The report shows the member's mean +- sd over folds and the three variants.
    report = (root / "results/held/report.html").read_text()
    row = pd.read_csv(root / "results/held/crossval.csv").iloc[0]
    assert f"{row.cv_iou_mean:.4f} ± {row.cv_iou_sd:.4f}" in report
    assert "ensemble + mirror" in report and f"{table.loc['ensemble'].test_dice:.4f}" in report


@pytest.mark.slow
def test_bad_crossval_and_ensemble_requests_are_one_line_errors(crossvalidated, tmp_path):
    root = crossvalidated
    assert "fold 2 does not exist" in user_error(
        run_cli("nas.retrain", "results/held", "--folds", "0,2", cwd=root)
    )
    assert "give 'all' or fold numbers" in user_error(
        run_cli("nas.retrain", "results/held", "--folds", "first", cwd=root)
    )
    # Without the folds' weights there is nothing to ensemble.
    copy = tmp_path / "copy"
    shutil.copytree(root / "results", copy / "results")
    shutil.rmtree(copy / "results/held/crossval")
    message = user_error(run_cli("nas.export", "results/held", "--ensemble", "folds", cwd=copy))
    assert "trial 0 has no cross-validated folds with weights" in message
    assert "train them with nas retrain results/held --trials 0 --folds all" in message
    plain = tmp_path / "plain"
    assert run_cli("nas.export", "results/held", "--format", "none", "--out", str(plain),
                   cwd=root).returncode == 0  # fmt: skip
    images = str(root / "Dataset003_Heldout/imagesTs")
    assert "model.pt2: not found" in user_error(
        run_cli("nas.predict", str(plain), images, "m", "--engine", "pt2", cwd=tmp_path)
    )
    card = yaml.safe_load((plain / "architecture.yaml").read_text())
    (plain / "architecture.yaml").write_text(yaml.safe_dump({**card, "members": ["../x"]}))
    assert "not a plain folder name" in user_error(
        run_cli("nas.predict", str(plain), images, "m", cwd=tmp_path)
    )
    assert not (tmp_path / "m").exists()


def test_the_predictor_averages_members_and_mirrored_passes_as_probabilities():
    ramp = torch.linspace(-2, 2, 6).reshape(1, 1, 6, 1)  # not flip-symmetric

    def first(x):
        return x * ramp

    def second(x):
        return x + ramp

    x = torch.randn(2, 1, 6, 4, generator=torch.Generator().manual_seed(0))
    mirrored = predictor([first, second], "sigmoid", spatial_dims=2, tta="mirror")(x)
    expected = torch.zeros_like(x)
    for run in (first, second):
        for flips in ((), (2,), (3,), (2, 3)):
            expected += torch.sigmoid(run(x.flip(flips))).flip(flips) / 8
    torch.testing.assert_close(mirrored, expected)
    plain = predictor([first], "softmax", spatial_dims=2)(torch.cat([x, -x], 1))
    torch.testing.assert_close(plain, torch.softmax(first(torch.cat([x, -x], 1)), 1))
    assert mirror_axes(3) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]


def test_largest_component_keeps_one_blob_per_chosen_class():
    classes = np.zeros((12, 12, 4), np.uint8)
    classes[1:5, 1:5, :] = 1  # the larger lesion blob
    classes[8:10, 8:10, :] = 1  # a stray blob
    classes[8:10, 1:3, :] = 2  # another class, two blobs
    classes[1:3, 8:10, 0] = 2
    kept = keep_largest_component(classes, [1])
    assert (kept == 1).sum() == 16 * 4 and kept[9, 9, 0] == 0
    np.testing.assert_array_equal(kept == 2, classes == 2)  # not chosen: untouched
    # A class joins the rule only where it raises the mean Dice over the cases.
    assert classes_helped([[0.5, 0.8], [0.7, 0.6]], [[0.6, 0.8], [0.7, 0.5]]) == [1]


@pytest.mark.slow
def test_a_fold_that_cannot_be_trained_is_recorded_failed_and_the_others_go_on(
    crossvalidated, tmp_path, monkeypatch
):
    copy = tmp_path / "copy"
    shutil.copytree(crossvalidated / "results", copy / "results")
    shutil.copytree(crossvalidated / "Dataset003_Heldout", copy / "Dataset003_Heldout")
    real_fit = crossval.fit

    def fit_failing_fold_1(model, train_cases, val_cases, *args, **kwargs):
        if any(case.name == "case_001" for case in val_cases):
            raise CandidateFailed("out of memory: a test")
        return real_fit(model, train_cases, val_cases, *args, **kwargs)

    monkeypatch.setattr(crossval, "fit", fit_failing_fold_1)
    # Other epochs than the recorded runs: both folds train again.
    result = run_cli("nas.retrain", "results/held", "--folds", "all", "--epochs", "2", cwd=copy)
    assert result.returncode == 0, result.stderr
    assert "failed (out of memory: a test)" in result.stdout
    storage = f"sqlite:///{copy / 'results/held/study.db'}"
    runs = optuna.load_study(study_name="held-crossval", storage=storage).trials
    held_out_by = {  # the fold whose validation holds case_001, from the first runs
        c["case"]: TrialRecord.of(t).fold for t in runs[:2] for c in TrialRecord.of(t).out_of_fold
    }
    failing = held_out_by["case_001"]
    states = {TrialRecord.of(t).fold: t.state.name for t in runs[2:]}
    assert states == {failing: "FAIL", 1 - failing: "COMPLETE"}
    failed = next(t for t in runs[2:] if t.state.name == "FAIL")
    assert "out of memory" in TrialRecord.of(failed).fail_reason
    # The summary is of the new runs alone: a fold trained for 1 epoch is not mixed in.
    row = pd.read_csv(copy / "results/held/crossval.csv").iloc[0]
    assert str(row.folds) == str(1 - failing) and row.epochs == 2


@pytest.mark.slow
def test_a_retrain_that_cannot_train_fails_its_trial_and_goes_on(
    crossvalidated, tmp_path, monkeypatch
):
    copy = tmp_path / "copy"
    shutil.copytree(crossvalidated / "results", copy / "results")

    def out_of_memory(*args, **kwargs):
        raise CandidateFailed("out of memory: a test")

    # Where retrain trains (nas.training.resumable, which may be imported already) and where the
    # other paths import it when they run.
    monkeypatch.setattr("nas.training.resumable.fit", out_of_memory)
    monkeypatch.setattr("nas.training.fit.fit", out_of_memory)
    result = run_cli("nas.retrain", "results/held", "--top", "1", "--epochs", "1", cwd=copy)
    assert result.returncode == 0, result.stderr
    assert "failed (out of memory: a test)" in result.stdout
    storage = f"sqlite:///{copy / 'results/held/study.db'}"
    (failed,) = optuna.load_study(study_name="held-retrain", storage=storage).trials
    assert failed.state.name == "FAIL" and "out of memory" in TrialRecord.of(failed).fail_reason


def test_ctrl_c_in_any_command_is_one_line_and_exit_code_130(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert exit_code(interrupted, None) == 130
    assert capsys.readouterr().err.strip().startswith("interrupted: finished work is kept")
