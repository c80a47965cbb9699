"""nas retrain at full length: checkpoints, --continue after a kill, a line per epoch, and the
best validation epoch's weights kept beside the final ones and exportable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from nas import build_unet
from nas.data import Slicing
from nas.data.labels import LabelScheme
from nas.search.record import StudyRecord, TrialRecord
from nas.training.fit import TrainConfig, fit, init_model
from nas.training.resumable import read_checkpoint, train_resumable
from tests.conftest import run_cli, tiny_space_yaml, user_error

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
CHECKPOINTS = "results/tiny/retrained/checkpoints"
# A run of 5 epochs of 2 steps, checkpointed after epochs 2 and 4 and at its end.
RUN = ("--trials", "0", "--epochs", "5", "--batches-per-epoch", "2", "--checkpoint-every", "2")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_dataset) -> Path:
    """A finished search of two trials, to copy into each test's folder."""
    folder = tmp_path_factory.mktemp("searched")
    (folder / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=2))
    assert run_cli("nas.run", "space.yaml", cwd=folder).returncode == 0
    return folder / "results"


def _copy(searched: Path, tmp_path: Path) -> Path:
    shutil.copytree(searched, tmp_path / "results")
    return tmp_path


def _retrain_study(folder: Path) -> optuna.Study:
    storage = f"sqlite:///{folder / 'results/tiny/study.db'}"
    return optuna.load_study(study_name="tiny-retrain", storage=storage)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_a_retrain_killed_mid_run_continues_to_the_steps_of_one_never_stopped(searched, tmp_path):
    whole = _copy(searched, tmp_path / "whole")
    result = run_cli("nas.retrain", "results/tiny", *RUN, cwd=whole)
    assert result.returncode == 0, result.stderr
    assert "  epoch 3/5: loss " in result.stdout and " s/epoch, " in result.stdout
    assert " left\n" in result.stdout and "val IoU" in result.stdout

    killed = _copy(searched, tmp_path / "killed")
    latest = killed / CHECKPOINTS / "trial_0000.latest.pt"
    process = subprocess.Popen([sys.executable, "-m", "nas.retrain", "results/tiny", *RUN],
                               cwd=killed, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, process.stderr.read()
    reached = read_checkpoint(latest)
    assert reached.epoch in (2, 4) and reached.steps == 2 * reached.epoch

    continued = run_cli("nas.retrain", "results/tiny", "--trials", "0", "--continue", cwd=killed)
    assert continued.returncode == 0, continued.stderr
    assert f"continuing from the checkpoint at epoch {reached.epoch}" in continued.stdout
    assert f"  epoch {reached.epoch + 1}/5: " in continued.stdout
    assert "  epoch 1/5: " not in continued.stdout

    # The same optimiser steps, batches and learning rates: the same network.
    never_stopped = read_checkpoint(whole / CHECKPOINTS / "trial_0000.latest.pt")
    finished = read_checkpoint(latest)
    assert finished.epoch == never_stopped.epoch == 5
    assert finished.steps == never_stopped.steps == 5 * 2
    lr = [c.optimizer["param_groups"][0]["lr"] for c in (finished, never_stopped)]
    assert lr[0] == pytest.approx(lr[1], rel=1e-9)
    final = [_weights(folder / CHECKPOINTS / "trial_0000.pt") for folder in (killed, whole)]
    for name, tensor in final[1].items():
        torch.testing.assert_close(final[0][name], tensor, msg=name)
    runs = [_retrain_study(folder).trials for folder in (killed, whole)]
    assert [len(r) for r in runs] == [1, 1]
    records = [TrialRecord.of(r[0]) for r in runs]
    assert records[0].steps == records[1].steps == 10 and records[0].epochs_run == 5
    assert sorted(runs[0][0].intermediate_values) == [1, 2, 3, 4, 5]  # the killed epochs too
    assert len(records[0].train_loss) == 5


def test_a_continued_segment_keeps_the_learning_rate_of_one_run(tiny_cases, tmp_path):
    """fit decays the learning rate over the epochs it is asked for; a run trained in
    segments between checkpoints decays it as fit does over the whole run."""
    unet = build_unet(spatial_dims=2, depth=2, base_channels=4).config
    cfg = TrainConfig(epochs=3, batches_per_epoch=2, batch_size_2d=4, patch_size_2d=(32, 32))
    scheme = LabelScheme(("lesion",), (0, 1))
    train_cases, val_cases = tiny_cases[1:], tiny_cases[:1]
    cpu = torch.device("cpu")

    def learning_rate_after(epochs: int) -> float:
        result = fit(init_model(unet, 0), train_cases, val_cases, scheme, cfg, cpu,
                     lambda r: r.epoch < epochs, Slicing())  # fmt: skip
        return result.optimizer_state["param_groups"][0]["lr"]

    path = tmp_path / "run.latest.pt"
    identity = {"epochs": 3, "checkpoint_every": 2}
    lines = []
    end = train_resumable(init_model(unet, 0), train_cases, val_cases, scheme, cfg, cpu,
                          Slicing(), path, identity, report=lines.append)  # fmt: skip
    at_two = read_checkpoint(path)  # the last written: the end is the caller's to write
    assert at_two.epoch == 2 and end.epoch == 3 and end.steps == 6
    assert at_two.optimizer["param_groups"][0]["lr"] == pytest.approx(learning_rate_after(2))
    assert end.optimizer["param_groups"][0]["lr"] == pytest.approx(learning_rate_after(3))
    assert sum(line.startswith("  epoch ") for line in lines) == 3


def test_best_and_final_weights_are_kept_and_exported_as_asked(searched, tmp_path):
    folder = _copy(searched, tmp_path)
    result = run_cli("nas.retrain", "results/tiny", *RUN, cwd=folder)
    assert result.returncode == 0, result.stderr
    # Epochs validate on the search's patches; the whole volumes once, at the end, and the
    # run records those.
    whole = float(result.stdout.split("whole validation volumes: IoU ")[1].split(",")[0])
    assert _retrain_study(folder).trials[0].values[0] == pytest.approx(whole, abs=5e-4)
    checkpoints = folder / CHECKPOINTS

    # The checkpoint is plain data: tensors, numbers, strings, lists and dicts.
    saved = torch.load(checkpoints / "trial_0000.latest.pt", weights_only=True)
    assert saved["identity"] == {"study": "tiny", "trial": 0, "all_cases": False, "fold": 0,
                                 "seed": 0, "epochs": 5, "batches_per_epoch": 2,
                                 "checkpoint_every": 2}  # fmt: skip
    assert saved["epoch"] == 5 and saved["steps"] == 10 and len(saved["history"]) == 5
    final = _weights(checkpoints / "trial_0000.pt")
    best = _weights(checkpoints / "trial_0000.best.pt")
    assert all(torch.equal(saved["weights"][k], v) for k, v in final.items())
    assert all(torch.equal(saved["best"]["weights"][k], v) for k, v in best.items())
    run = _retrain_study(folder).trials[0]
    curve = run.intermediate_values
    best_epoch = max(curve, key=lambda epoch: (curve[epoch], -epoch))
    assert TrialRecord.of(run).best == {
        "epoch": best_epoch, "iou": curve[best_epoch], "dice": saved["best"]["dice"]
    }  # fmt: skip
    assert saved["best"]["epoch"] == best_epoch

    for wanted, kind, weights in (
        ("auto", "retrained", final),
        ("retrained-best", "retrained-best", best),
    ):
        out = tmp_path / f"model_{wanted}"
        exported = run_cli("nas.export", "results/tiny", "--trial", "0", "--weights", wanted,
                           "--format", "none", "--out", str(out), cwd=folder)  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        source = yaml.safe_load((out / "architecture.yaml").read_text())["source"]["weights"]
        assert source["kind"] == kind
        assert source["epochs_run"] == (5 if kind == "retrained" else best_epoch)
        written = _weights(out / "weights.pt")
        assert all(torch.equal(written[k], v) for k, v in weights.items() if k in written)

    # --all-cases validates nothing: its final weights only, and no best to export.
    trained = run_cli("nas.retrain", "results/tiny", "--trials", "1", "--all-cases", "--epochs",
                      "1", "--batches-per-epoch", "1", cwd=folder)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert "nothing to validate on: final weights only" in trained.stdout
    all_cases = folder / "results/tiny/retrained/all_cases/checkpoints"
    assert sorted(p.name for p in all_cases.iterdir()) == ["trial_0001.latest.pt", "trial_0001.pt"]
    assert StudyRecord.of(_retrain_study(folder)).all_cases["1"]["steps"] == 1
    message = user_error(run_cli("nas.export", "results/tiny", "--trial", "1", "--weights",
                                 "retrained-best", "--out", "x", cwd=folder))  # fmt: skip
    assert "has no best retrained weights" in message
    assert "--all-cases validates nothing, so it keeps only its final weights" in message
    assert not (folder / "x").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    """The bytes of every file under results/tiny but the storage, which opening the study
    may touch (the tests check the storage by its studies)."""
    results = folder / "results/tiny"
    return {
        str(p.relative_to(results)): p.read_bytes()
        for p in sorted(results.rglob("*"))
        if p.is_file() and not p.name.startswith("study.db")
    }


def test_bad_continuations_and_counts_are_one_line_errors_that_write_nothing(searched, tmp_path):
    folder = _copy(searched, tmp_path)
    before = _snapshot(folder)
    latest = f"{CHECKPOINTS}/trial_0000.latest.pt"
    for args, expected in (
        (["--batches-per-epoch", "0"], "error: --batches-per-epoch: must be at least 1, not 0"),
        (["--checkpoint-every", "0"], "error: --checkpoint-every: must be at least 1, not 0"),
        (["--batches-per-epoch", "1000000"], "error: --batches-per-epoch: Input should be less "
                                             "than or equal to 100000"),
        (["--continue"], f"error: --continue: trial 0 has no checkpoint to continue ({latest}); "
                         "retrain it without --continue"),
        (["--all-cases", "--continue"], "error: --continue: trial 0 has no checkpoint to "
                                        "continue (results/tiny/retrained/all_cases/"),
        (["--continue", "--folds", "all"], "error: --continue: applies to nas retrain and "
                                           "--all-cases, not to --folds"),
    ):  # fmt: skip
        message = user_error(run_cli("nas.retrain", "results/tiny", "--trials", "0", *args,
                                     cwd=folder))  # fmt: skip
        assert message.startswith(expected), message
    assert _snapshot(folder) == before
    assert not (folder / "results/tiny/retrained").exists()
    assert "tiny-retrain" not in optuna.get_all_study_names(
        f"sqlite:///{folder / 'results/tiny/study.db'}"
    )

    one_epoch = ("--epochs", "2", "--batches-per-epoch", "1")
    result = run_cli("nas.retrain", "results/tiny", "--trials", "0", *one_epoch, cwd=folder)
    assert result.returncode == 0, result.stderr
    checkpoints = folder / CHECKPOINTS
    shutil.copy(checkpoints / "trial_0000.latest.pt", checkpoints / "trial_0001.latest.pt")
    before = _snapshot(folder)
    for trials, args, expected in (
        ("1", [], "holds a run with trial 0, not 1"),
        ("0", ["--epochs", "3"], "holds a run with --epochs 2, not 3"),
        ("0", ["--batches-per-epoch", "2"], "holds a run with --batches-per-epoch 1, not 2"),
    ):
        message = user_error(run_cli("nas.retrain", "results/tiny", "--trials", trials,
                                     "--continue", *args, cwd=folder))  # fmt: skip
        assert message.startswith("error: --continue: ") and expected in message, message
        assert "give the settings it was started with" in message
    (checkpoints / "trial_0001.latest.pt").write_bytes(b"not a checkpoint")
    message = user_error(run_cli("nas.retrain", "results/tiny", "--trials", "1", "--continue",
                                 cwd=folder))  # fmt: skip
    assert "trial_0001.latest.pt: is not a checkpoint nas retrain can continue" in message
    after = _snapshot(folder)
    after.pop("retrained/checkpoints/trial_0001.latest.pt")
    before.pop("retrained/checkpoints/trial_0001.latest.pt")
    assert after == before
    assert len(_retrain_study(folder).trials) == 1

    # A run that finished has nothing to continue.
    finished = run_cli("nas.retrain", "results/tiny", "--trials", "0", "--continue", cwd=folder)
    assert finished.returncode == 0, finished.stderr
    assert "its run finished (2 epochs): nothing to continue" in finished.stdout
    assert len(_retrain_study(folder).trials) == 1
