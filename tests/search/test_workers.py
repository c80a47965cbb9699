"""Many workers, one study: a real PostgreSQL server, SQLite with several local workers, a
journal file; a worker killed with SIGKILL mid-trial, and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from nas.search.record import TrialRecord
from nas.search.results import pareto_front
from tests.conftest import run_cli, tiny_space_yaml, wait_for

pytestmark = pytest.mark.slow

# Trials of a few seconds, so a worker can be killed in the middle of one; heartbeats every
# second, a silent worker's trial failed after 10 s (a loaded machine may delay a live
# worker's heartbeat by seconds) and retried once.
STUDY_EXTRAS = "  heartbeat: {heartbeat_interval: 1, grace_period: 10, retries: 1}\n"


def _space(tiny_dataset, n_trials: int) -> str:
    space = tiny_space_yaml(tiny_dataset, "many", n_trials, STUDY_EXTRAS)
    return space.replace("epochs: 2", "epochs: 8").replace(
        "batches_per_epoch: 3", "batches_per_epoch: 4"
    )


def _check_accounted_for(study: optuna.Study, n_trials: int, results: Path) -> None:
    trials = study.trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    retried = {t.system_attrs.get("failed_trial", TrialRecord.of(t).retry_of) for t in trials}
    settled = [t for t in trials if not (t.state == TrialState.FAIL and t.number in retried)]
    assert len(settled) >= n_trials  # every requested trial ran to an end
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # No candidate ran twice: every new one has its own sampled learning rate, and every
    # promoted one (8 epochs: rungs at 3 and 8) was continued by one trial, from its own rung.
    new = [t for t in done if TrialRecord.of(t).continues is None]
    rates = [t.params["learning_rate"] for t in new]
    assert len(rates) == len(set(rates))
    continued = [
        TrialRecord.of(t).continues for t in done if TrialRecord.of(t).continues is not None
    ]
    assert len(continued) == len(set(continued))
    by_number = {t.number: t for t in trials}
    for trial in done:
        if TrialRecord.of(trial).continues is not None:
            parent = by_number[TrialRecord.of(trial).continues]
            assert trial.params == parent.params
            # the parent's curve, continued
            assert parent.intermediate_values.items() <= trial.intermediate_values.items()
            assert TrialRecord.of(parent).epochs_run == 3 < TrialRecord.of(trial).epochs_run
    table = pd.read_csv(results / "pareto.csv")
    assert sorted(table.number) == sorted(t.number for t in pareto_front(study))


def _study_once_created(storage: str) -> optuna.Study | None:
    """The run's study "many", or None while the run is still creating it. Opening a storage
    sets up its schema, so this process and the run can both try to stamp Optuna's schema
    version at once; the loser's IntegrityError only means "not ready yet"."""
    try:
        return optuna.load_study(study_name="many", storage=storage)
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):
        return None


def test_three_workers_on_postgres_survive_a_killed_worker(tmp_path, tiny_dataset, postgres_url):
    (tmp_path / "space.yaml").write_text(_space(tiny_dataset, n_trials=6))
    command = [sys.executable, "-m", "nas.run", "space.yaml", "--storage", postgres_url,
               "--workers", "3"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    parent = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        storage = postgres_url

        def trial_in_its_second_epoch():
            """A new trial that has trained its first epoch alone: it trains at least two more
            epochs before its first rung (3) can end it, so the kill lands mid-trial
            whatever the machine's speed. A trial that continues another is not chosen."""
            study = _study_once_created(storage)
            if study is None:
                return None
            running = [
                t
                for t in study.trials
                if t.state == TrialState.RUNNING
                and TrialRecord.of(t).continues is None
                and TrialRecord.of(t).epochs_run == 1
            ]
            return running[0] if running else None

        victim = wait_for(trial_in_its_second_epoch, 240, "a trial in its second epoch", parent)
        pid = int(TrialRecord.of(victim).worker.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        output, _ = parent.communicate(timeout=400)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 1, output
    assert "exited with -9" in output

    # Resume: the same command again (one worker), as a user would after losing a node.
    result = run_cli("nas.run", "space.yaml", "--storage", postgres_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="many", storage=postgres_url)
    killed = study.trials[victim.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert len({TrialRecord.of(t).worker for t in study.trials}) >= 3
    _check_accounted_for(study, 6, tmp_path / "results" / "many")


def test_two_workers_share_sqlite_without_locking_errors(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, "many", 6))
    result = run_cli("nas.run", "space.yaml", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "database is locked" not in result.stdout + result.stderr
    study = optuna.load_study(
        study_name="many", storage=f"sqlite:///{tmp_path / 'results/many/study.db'}"
    )
    assert len({TrialRecord.of(t).worker for t in study.trials}) == 2
    _check_accounted_for(study, 6, tmp_path / "results" / "many")


def test_ctrl_c_abandons_the_trial_writes_results_and_the_rerun_retries_it(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(_space(tiny_dataset, n_trials=4))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.Popen([sys.executable, "-m", "nas.run", "space.yaml"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    storage = f"sqlite:///{tmp_path / 'results/many/study.db'}"

    def second_trial_running():
        if not (tmp_path / "results/many/study.db").exists():
            return False
        study = _study_once_created(storage)
        if study is None:
            return False
        trials = study.trials
        # In training (an epoch done), so it has drawn all its parameters: a Ctrl-C while
        # it samples would rerun it with the parameters drawn so far, the rest drawn anew.
        last = trials[-1] if len(trials) >= 2 else None
        return (
            last is not None
            and last.state == TrialState.RUNNING
            and TrialRecord.of(last).epochs_run is not None
        )

    wait_for(second_trial_running, 240, "the second trial's first epoch", run)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 130, output
    assert "interrupted" in output
    study = optuna.load_study(study_name="many", storage=storage)
    abandoned = study.trials[-1]
    assert abandoned.state == TrialState.FAIL
    assert TrialRecord.of(abandoned).fail_reason.startswith("interrupted")
    table = pd.read_csv(tmp_path / "results/many/trials.csv")
    assert len(table) == len(study.trials)  # results/ written on the way out

    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="many", storage=storage)
    (retry,) = [t for t in study.trials if TrialRecord.of(t).retry_of == abandoned.number]
    assert retry.params == abandoned.params and retry.state == TrialState.COMPLETE
    _check_accounted_for(study, 4, tmp_path / "results" / "many")


def test_a_journal_file_holds_a_study_too(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, "many", 2))
    journal = f"journal:///{tmp_path / 'shared' / 'many.log'}"
    result = run_cli("nas.run", "space.yaml", "--storage", journal, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "shared" / "many.log").stat().st_size > 0
    report = run_cli("nas.report", "results/many", "--storage", journal, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
