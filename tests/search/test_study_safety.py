"""A user's study is sacred: names stay inside results/, a resume keeps to the study's data and
space, passwords stay hidden, failures after training keep their reason, a crash leaves no
trial counted as running, and nothing a killed process was writing lingers."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState, create_trial

from nas.commands.run import main, parse_args
from nas.core.errors import NasError
from nas.search import resume
from nas.search.record import StudyRecord, TrialRecord, write_study
from nas.search.results import write_results
from nas.search.space_file import load_space
from nas.search.storage import load_study
from nas.search.weights import checkpoint_path, save_checkpoint
from nas.search.workers import worker_command
from tests.conftest import run_cli, tiny_space_yaml, wait_for

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def nas_run(tmp_path, monkeypatch, capsys):
    """`python -m nas.run ARGS` in tmp_path, through its entry point in this process: the
    same code path without an interpreter start-up per call."""
    monkeypatch.chdir(tmp_path)

    def call(*args: str) -> Result:
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return call


def _storage(tmp_path: Path, name: str = "tiny") -> str:
    return f"sqlite:///{tmp_path / 'results' / name / 'study.db'}"


def _load(tmp_path: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage(tmp_path, name))


def _trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return load_study(storage, name).trials
    except Exception:  # not created yet, or the file is being made
        return []


# --- study names ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escaped", "..", ".", "a/b", ".hidden"])
def test_a_study_name_that_leaves_results_is_refused(
    tmp_path, tiny_dataset, name, monkeypatch, capsys
):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["../space.yaml", "--study-name", name]) == 2
    assert capsys.readouterr().err.startswith("error: --study-name: invalid value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "work"]
    assert list((tmp_path / "work").iterdir()) == []


def test_a_study_name_of_dots_in_the_yaml_is_refused(tmp_path, tiny_dataset, monkeypatch, capsys):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, name=".."))
    monkeypatch.chdir(tmp_path)
    assert main(["space.yaml"]) == 2
    assert capsys.readouterr().err.startswith("error: space.yaml: study.name:")
    assert not (tmp_path / "results").exists()


# --- passwords --------------------------------------------------------------------------


def test_workers_get_the_storage_from_the_environment_not_the_command_line(tmp_path):
    url = "postgresql+psycopg://nas:hunter2@db-host/nas"
    args = parse_args(["space.yaml", "--storage", url, "--workers", "2"])
    command = worker_command(args, 0, 1, 0)
    assert "hunter2" not in " ".join(command) and "--storage" not in command
    os.environ["NAS_STORAGE"] = url
    try:
        assert parse_args(["space.yaml"]).storage == url  # what each worker reads
    finally:
        del os.environ["NAS_STORAGE"]


def test_a_storage_password_is_never_printed(tmp_path, tiny_dataset, nas_run):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    url = "postgresql+psycopg://nas:hunter2@127.0.0.1:1/nas"  # nothing listens on port 1
    result = nas_run("space.yaml", "--storage", url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "nas:***@127.0.0.1:1/nas" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    bad = nas_run("space.yaml", "--storage", "postgresql://u:hunter2@/x:y")
    assert bad.returncode == 2 and "hunter2" not in bad.stdout + bad.stderr


# --- resuming ---------------------------------------------------------------------------


def test_resuming_with_another_space_or_data_is_refused_and_changes_nothing(
    tmp_path, tiny_dataset, nas_run
):
    space = tiny_space_yaml(tiny_dataset, n_trials=1)
    (tmp_path / "space.yaml").write_text(space)
    assert nas_run("space.yaml").returncode == 0
    before = _load(tmp_path)
    stored = dict(before.user_attrs)

    changed = space.replace(
        "depth: {type: int, low: 1, high: 3}", "depth: {type: int, low: 1, high: 4}"
    )
    (tmp_path / "space.yaml").write_text(changed.replace("n_trials: 1", "n_trials: 2"))
    result = nas_run("space.yaml")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "another search space: search.depth" in result.stderr
    assert "--extend-space" in result.stderr

    # A changed categorical cannot be continued by Optuna, even when asked to extend.
    categorical = space.replace("choices: [2, 3]", "choices: [2]")
    (tmp_path / "space.yaml").write_text(categorical.replace("n_trials: 1", "n_trials: 2"))
    result = nas_run("space.yaml", "--extend-space")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot extend study 'tiny': parameter spatial_dims" in result.stderr

    other_data = space.replace("n_folds: 3", "n_folds: 2").replace("n_trials: 1", "n_trials: 2")
    (tmp_path / "space.yaml").write_text(other_data)
    result = nas_run("space.yaml")
    assert result.returncode == 2
    assert "other data settings: data.n_folds was 3, now 2" in result.stderr

    after = _load(tmp_path)
    assert len(after.trials) == 1 and dict(after.user_attrs) == stored

    # Extending a range with the flag continues the study and records the new space.
    (tmp_path / "space.yaml").write_text(changed.replace("n_trials: 1", "n_trials: 2"))
    result = nas_run("space.yaml", "--extend-space")
    assert result.returncode == 0, result.stdout + result.stderr
    extended = _load(tmp_path)
    assert len(extended.trials) == 2
    recorded = StudyRecord.of(extended)
    assert recorded.space["search"]["depth"] == [{"type": "int", "low": 1, "high": 4}]
    assert recorded.data_config == stored["data_config"]


# --- the front's weights ----------------------------------------------------------------


class _FinishesDuringTheRewrite:
    """A real study whose trial `late` completes (on the front) right after the rewrite's
    first read of the storage, as when another worker finishes at that moment."""

    def __init__(self, study: optuna.Study, late: int) -> None:
        self._study, self._late, self._reads = study, late, 0

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _after_read(self, value):
        self._reads += 1
        if self._reads == 1:
            self._study._storage.set_trial_user_attr(self._trial_id(), "val_iou", 0.99)
            self._study._storage.set_trial_user_attr(self._trial_id(), "n_params", 10)
            self._study.tell(self._late, [0.99, 10])
        return value

    def _trial_id(self) -> int:
        return next(t._trial_id for t in self._study.trials if t.number == self._late)

    @property
    def best_trials(self):
        return self._after_read(self._study.best_trials)

    @property
    def trials(self):
        return self._after_read(self._study.trials)

    def get_trials(self, *args, **kwargs):
        return self._after_read(self._study.get_trials(*args, **kwargs))


def test_a_trial_finishing_during_a_rewrite_keeps_its_weights(tmp_path):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", directions=["maximize", "minimize"]
    )
    for iou, n_params in ((0.5, 100), (0.2, 500)):
        attrs = {"val_iou": iou, "n_params": n_params}  # as the objective records them
        study.add_trial(create_trial(values=[iou, n_params], user_attrs=attrs))
    late = study.ask().number  # running, weights already saved, as the objective does
    for number in (0, 1, late):
        save_checkpoint(tmp_path, number, {"w": torch.zeros(1)})

    front = write_results(_FinishesDuringTheRewrite(study, late), tmp_path)
    assert checkpoint_path(tmp_path, late).exists()
    assert checkpoint_path(tmp_path, 0).exists()
    assert not checkpoint_path(tmp_path, 1).exists()  # dominated by trial 0
    assert [t.number for t in front] == [0]  # as of the one read, before `late` finished
    assert write_results(study, tmp_path)[0].number == late  # the next rewrite has it


# --- failures after training ------------------------------------------------------------


def test_a_checkpoint_or_refresh_failure_keeps_the_reason_and_the_search_goes_on(
    tmp_path, tiny_dataset, nas_run
):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=2))
    out = tmp_path / "results" / "tiny"
    out.mkdir(parents=True)
    (out / "checkpoints").write_text("not a folder")  # every checkpoint write fails
    (out / "report.html").mkdir()  # and so does every report rewrite
    result = nas_run("space.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: could not rewrite" in result.stderr and "Traceback" not in result.stderr
    trials = _load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    for trial in trials:
        assert TrialRecord.of(trial).fail_reason.startswith("trained, but its weights could not")
        assert TrialRecord.of(trial).iou >= 0  # the scores stay with the trial
    assert len(pd.read_csv(out / "trials.csv")) == 2  # the other views are still written


def test_a_candidate_too_large_for_memory_fails_before_training(tmp_path, tiny_dataset, nas_run):
    space = tiny_space_yaml(tiny_dataset, n_trials=2, extra="  max_memory_gb: 1.0e-6\n")
    (tmp_path / "space.yaml").write_text(space)
    result = nas_run("space.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    for trial in _load(tmp_path).trials:
        assert trial.state == TrialState.FAIL
        assert "max_memory_gb" in TrialRecord.of(trial).fail_reason
        assert "epochs_run" not in trial.user_attrs and not trial.intermediate_values


# --- crashes and interrupts -------------------------------------------------------------


def _slow_space(tiny_dataset, n_trials: int, grace_period: int = 600, batches: int = 4) -> str:
    extra = f"  heartbeat: {{heartbeat_interval: 1, grace_period: {grace_period}, retries: 1}}\n"
    space = tiny_space_yaml(tiny_dataset, "many", n_trials, extra)
    return space.replace("epochs: 2", "epochs: 8").replace(
        "batches_per_epoch: 3", f"batches_per_epoch: {batches}"
    )


def _epoch_running(storage: str, name: str, epoch: int = 1):
    """A trial that has finished `epoch` epochs and is still running, if any."""

    def check():
        running = [
            t
            for t in _trials(storage, name)
            if t.state == TrialState.RUNNING and (TrialRecord.of(t).epochs_run or 0) >= epoch
        ]
        return running[0] if running else None

    return check


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_killed_run_then_the_same_command_ends_with_every_trial_settled(
    tmp_path, tiny_dataset, kind
):
    # A grace period far longer than the test: the dead worker's trial must be recognised
    # as dead without waiting for its heartbeat (it was this host's process).
    (tmp_path / "space.yaml").write_text(_slow_space(tiny_dataset, n_trials=2))
    storage = _storage(tmp_path, "many")
    extra = []
    if kind == "journal":
        storage = f"journal:///{tmp_path / 'many.log'}"
        extra = ["--storage", storage]
    command = [sys.executable, "-m", "nas.run", "space.yaml", "--n-trials", "2", *extra]
    run = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        victim = wait_for(_epoch_running(storage, "many"), 240, "a trial's first epoch", run)
        run.kill()
        run.wait()
    finally:
        if run.poll() is None:
            run.kill()
    result = run_cli("nas.run", *command[3:], cwd=tmp_path)  # the same command again
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"trial(s) {victim.number} lost their worker" in result.stdout
    trials = load_study(storage, "many").trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    dead = trials[victim.number]
    assert dead.state == TrialState.FAIL
    assert TrialRecord.of(dead).fail_reason.endswith("died")
    reruns = [
        t
        for t in trials
        if victim.number in (t.system_attrs.get("failed_trial"), TrialRecord.of(t).retry_of)
    ]
    assert len(reruns) == 1 and reruns[0].params == dead.params
    assert reruns[0].state == TrialState.COMPLETE
    settled = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len([t for t in settled if TrialRecord.of(t).continues is None]) == 2  # new candidates


def test_ctrl_c_twice_with_workers_leaves_no_trial_running(tmp_path, tiny_dataset):
    # Epochs long enough (a second or more) that two workers' trials surely overlap in
    # training between two looks at the storage, however busy the machine.
    (tmp_path / "space.yaml").write_text(_slow_space(tiny_dataset, n_trials=4, batches=40))
    storage = _storage(tmp_path, "many")
    # Its own session, so that the terminal-like signal below reaches it and not pytest.
    run = subprocess.Popen([sys.executable, "-m", "nas.run", "space.yaml", "--workers", "2"],
                           cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip

    def both_training():
        running = [
            t
            for t in _trials(storage, "many")
            if t.state == TrialState.RUNNING and 1 <= (TrialRecord.of(t).epochs_run or 0) <= 4
        ]
        return running if len(running) >= 2 else None

    try:
        training = wait_for(both_training, 240, "two trials in training", run)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C at the terminal reaches its process group
        time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)  # an impatient second Ctrl-C
        output, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, output
    trials = _load(tmp_path, "many").trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    abandoned = [t for t in trials if t.state == TrialState.FAIL]
    assert abandoned, output
    assert all(TrialRecord.of(t).fail_reason.startswith("interrupted") for t in abandoned)
    # Each trial seen in training was abandoned, unless it finished its last epochs in the
    # moment between that look and the signal.
    for seen in training:
        assert trials[seen.number].state in (TrialState.FAIL, TrialState.COMPLETE)


# --- what is left on disk ---------------------------------------------------------------


def test_results_are_readable_by_others_and_dead_staging_is_removed(
    tmp_path, tiny_dataset, nas_run
):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=1))
    out = tmp_path / "results" / "tiny"
    (out / "checkpoints").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename
    leftovers = [
        out / f".trials.csv.{host}-{dead.pid}.abc123.csv",
        out / "checkpoints" / f".trial_0007.pt.{host}-{dead.pid}.xyz.pt",
    ]
    live = out / f".pareto.csv.{host}-{os.getpid()}.def456.csv"  # this process: alive
    for path in [*leftovers, live]:
        path.write_text("half written")
    old_umask = os.umask(0o022)
    try:
        result = nas_run("space.yaml")
    finally:
        os.umask(old_umask)
    assert result.returncode == 0, result.stderr
    assert not any(path.exists() for path in leftovers)
    assert live.exists()
    for name in ("trials.csv", "pareto.csv", "pareto.png", "report.html"):
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == 0o644, f"{name}: {oct(mode)}"


def _recorded_study(tmp_path, tiny_dataset):
    """The tiny space, a study that recorded it with two training and one validation case,
    and that data record."""
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    space = load_space(tmp_path / "space.yaml")
    study = optuna.create_study(directions=["maximize", "minimize"])
    data = {
        "data_config": space.data.to_dict(),
        "data_description": {"labels": {"background": 0, "lesion": 1}},
        "data_cases": {"train": ["a", "b"], "validation": ["c"]},
    }
    resume.record(study, space, data)
    return space, study, data


def test_a_resume_with_other_cases_names_them(tmp_path, tiny_dataset):
    space, study, data = _recorded_study(tmp_path, tiny_dataset)
    resume.check(study, space, data, tmp_path / "space.yaml", extend_space=False)  # the same
    more = data | {"data_cases": {"train": ["a", "b", "d", "e"], "validation": ["c"]}}
    with pytest.raises(NasError) as refused:
        resume.check(study, space, more, tmp_path / "space.yaml", extend_space=False)
    assert "other training and validation cases: cases.train: 2 (d, e) added, 0 removed" in str(
        refused.value
    )
    assert StudyRecord.of(study).data_cases == data["data_cases"]  # nothing overwritten


def test_a_resume_on_other_validation_patches_is_refused(tmp_path, tiny_dataset):
    """Scores on other validation patches do not compare with the study's: another patch
    count or seed is refused with what changed; another bootstrap count is not."""
    space, study, data = _recorded_study(tmp_path, tiny_dataset)
    write_study(study, validation=resume.validation_record(space))
    kept = dict(StudyRecord.of(study).validation)
    validation = space.study.validation
    fewer = space.study.model_copy(update={"validation": validation.model_copy(
        update={"patches_per_case": validation.patches_per_case // 2})})  # fmt: skip
    for study_section, said in (
        (fewer, f"study.validation.patches_per_case {validation.patches_per_case} -> "),
        (space.study.model_copy(update={"seed": space.study.seed + 1}), "study.seed "),
    ):
        other = space.model_copy(update={"study": study_section})
        with pytest.raises(NasError) as refused:
            resume.check(study, other, data, tmp_path / "space.yaml", extend_space=True)
        assert "was validated on other patches" in str(refused.value)
        assert said in str(refused.value)
    assert StudyRecord.of(study).validation == kept  # nothing overwritten
    more = validation.model_copy(update={"bootstrap": validation.bootstrap + 1})
    resampled = space.model_copy(
        update={"study": space.study.model_copy(update={"validation": more})}
    )
    resume.check(study, resampled, data, tmp_path / "space.yaml", extend_space=False)
