"""How `nas.run` is driven and what it shows: `--set key.path=value` and `--data PATH` (one
YAML, many runs; the effective space validated like the file, saved beside the study, a resume
with another one says what changed), `-q`, the progress bar and run.log."""

from __future__ import annotations

import logging
import time
import warnings

import optuna
import pytest
import yaml

from nas.commands import run as run_module
from nas.search.console import RunProgress, run_log
from nas.search.workers import worker_command
from tests.conftest import run_cli, tiny_space_yaml, user_error


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "train.epochs=0",
            "error: --set: train.epochs: invalid value 0: "
            "Input should be greater than or equal to 1",
        ),
        ("train.epochs", "error: --set: 'train.epochs' is not key.path=value"),
        ("study..seed=1", "error: --set: 'study..seed=1' is not key.path=value"),
        ("train.epochs=[1", "error: --set train.epochs: not valid YAML"),
        ("train.no_such_key=1", "error: --set: train.no_such_key: unknown parameter"),
        (
            "train.epochs.low=1",
            "error: --set: train.epochs.low: epochs holds a value, not a section",
        ),
        # A check of the whole section, caused by the setting.
        ("data.fold=9", "error: --set: data: fold 9 does not exist with n_folds 5"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_and_nothing_is_created(tmp_path, setting, message):
    (tmp_path / "space.yaml").write_text("train: {epochs: 30}\n")
    result = run_cli("nas.run", "space.yaml", "--set", setting, cwd=tmp_path)
    assert user_error(result).startswith(message)
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_settings_and_data_make_the_effective_space_saved_beside_the_study(tmp_path, tiny_dataset):
    # The file names a dataset that is not there: --data replaces it (and its synthetic spec).
    space = tiny_space_yaml(tmp_path / "elsewhere", n_trials=3)
    (tmp_path / "space.yaml").write_text(space)
    args = ["--data", str(tiny_dataset), "--set", "study.n_trials=1", "--set", "train.epochs=1"]
    result = run_cli("nas.run", "space.yaml", *args, "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trial   0" not in result.stdout.split("Pareto front")[0]  # -q: no line per trial
    log = (tmp_path / "results/tiny/run.log").read_text()
    assert log.splitlines()[0].endswith("nas run space.yaml " + " ".join(args) + " -q")
    assert result.stdout in log  # what the console showed
    assert not (tmp_path / "elsewhere").exists()
    saved = yaml.safe_load((tmp_path / "results/tiny/space.yaml").read_text())
    assert saved["data"]["path"] == str(tiny_dataset) and "synthetic" not in saved["data"]
    assert saved["train"]["epochs"] == 1 and saved["study"]["n_trials"] == 1
    assert saved["search"] == yaml.safe_load(space)["search"]  # the rest as the file says

    again = run_cli("nas.run", "space.yaml", *args, "--set", "train.epochs=2", cwd=tmp_path)
    message = user_error(again)
    assert "another search space" in message and "epochs" in message
    assert yaml.safe_load((tmp_path / "results/tiny/space.yaml").read_text()) == saved


def test_the_progress_bar_stands_at_the_limit_nearest_its_end():
    start = time.monotonic() - 210  # half of a 420 s run has passed
    bar = RunProgress(100, 420.0, 20_000, start, disable=True)
    bar.update(settled=9, steps=5_000)  # 9 % of the trials, a quarter of the steps
    assert bar.bar.n == pytest.approx(50, abs=1)
    assert bar.bar.desc.startswith("9/100 trials · 21") and bar.bar.desc.endswith("steps")
    bar.update(settled=90, steps=5_000)
    assert bar.bar.n == pytest.approx(90)
    alone = RunProgress(4, None, None, time.monotonic(), disable=True)
    alone.update(settled=1, steps=0)
    assert alone.bar.n == 25 and alone.bar.desc == "1/4 trials"


def test_run_log_keeps_the_output_and_optunas_warnings_once_attached(tmp_path, capsys):
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # as the commands set it
    with run_log("nas run space.yaml") as log:
        print("before the study folder exists")
        log.attach(tmp_path / "run.log")
        print("after")
        optuna.logging.get_logger("optuna.test").warning("an optuna warning")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a python warning", UserWarning, stacklevel=1)
    text = (tmp_path / "run.log").read_text()
    for line in (
        "before the study folder exists",
        "after",
        "an optuna warning",
        "a python warning",
    ):
        assert line in text
    console = capsys.readouterr()
    assert "an optuna warning" not in console.err  # the console keeps Optuna's verbosity
    assert "a python warning" in console.err and "after" in console.out
    assert logging.getLogger("optuna").level == logging.ERROR  # restored


def test_a_run_refused_for_bad_data_writes_no_log(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=1))
    result = run_cli("nas.run", "space.yaml", "--data", "missing", cwd=tmp_path)
    assert "missing" in user_error(result)
    assert not (tmp_path / "results").exists()


def test_a_dry_run_prints_the_plan_and_creates_no_study(tmp_path, tiny_dataset, caplog):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=5))
    result = run_cli("nas.run", "space.yaml", "--dry-run", "--set", "study.seed=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "6 cases, 4 training / 2 validation (fold 0 of 3 folds)" in out
    assert "patch plan for cpu" in out and "objectives iou, params" in out
    assert "sampler random, up to 5 trials" in out
    assert "first candidate:" in out and "GMACs per" in out and "one training step" in out
    assert out.strip().endswith("dry run: no study was created")
    assert not (tmp_path / "results").exists()
    assert not [r for r in caplog.records if "A new study created" in r.getMessage()]
    verbose = run_cli("nas.run", "space.yaml", "--dry-run", "-v", cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    # -v: Optuna's own log at INFO (the throwaway study of the dry run announces itself).
    assert [r for r in caplog.records if "A new study created in memory" in r.getMessage()]


def test_workers_search_the_same_effective_space(tmp_path):
    args = run_module.parse_args(
        ["space.yaml", "--workers", "2", "--set", "train.epochs=3", "--data", "d", "-q"]
    )
    command = worker_command(args, 1, threads=1, data_workers=0)
    assert command[command.index("--set") + 1] == "train.epochs=3"
    assert command[command.index("--data") + 1] == "d" and "-q" in command
    worker = run_module.parse_args(command[3:])  # after `python -m nas.run`
    assert worker.settings == ["train.epochs=3"] and str(worker.data) == "d"
