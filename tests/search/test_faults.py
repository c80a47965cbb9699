"""Fault injection: two workers share a SQLite study while one of them is killed with SIGKILL
five times (during training, while it rewrites results/, while it writes a checkpoint), then
the search is resumed. Nothing may be lost: every trial settles, the front keeps its weights,
pareto.csv is the storage's front, and no half-written file remains."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from nas.search.record import TrialRecord
from nas.search.scoring import front_of
from nas.search.weights import checkpoint_path
from tests.conftest import run_cli, tiny_space_yaml

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
N_TRIALS = 8
# Where the victim is killed: phases seen through the files it holds open, else at random.
PHASES = ("rewrite", "training", "checkpoint", "rewrite", "training")


def _open_files(pid: int) -> list[str]:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    found = []
    for name in names:
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            continue
    return found


def _in_phase(pid: int, phase: str, study_dir: Path, storage: str) -> bool:
    files = _open_files(pid)
    if phase == "rewrite":
        return any(f.endswith(".results.lock") for f in files)
    if phase == "checkpoint":
        return any(re.search(r"/checkpoints/\.trial_\d+\.pt\.", f) for f in files)
    try:
        running = optuna.load_study(study_name="faults", storage=storage).get_trials(
            deepcopy=False, states=(TrialState.RUNNING,)
        )
    except Exception:
        return False
    me = f"{socket.gethostname()}:{pid}"
    return any(TrialRecord.of(t).worker == me and TrialRecord.of(t).epochs_run for t in running)


def _start(tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nas.run", "space.yaml"], cwd=tmp_path,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_a_worker_killed_five_times_loses_nothing(tmp_path, tiny_dataset):
    extra = "  heartbeat: {heartbeat_interval: 1, grace_period: 600, retries: 3}\n"
    space = tiny_space_yaml(tiny_dataset, "faults", N_TRIALS, extra)
    space = space.replace("epochs: 2", "epochs: 4").replace(
        "batches_per_epoch: 3", "batches_per_epoch: 6"
    )
    (tmp_path / "space.yaml").write_text(space)
    study_dir = tmp_path / "results" / "faults"
    storage = f"sqlite:///{study_dir / 'study.db'}"
    rng = random.Random(0)

    survivor = _start(tmp_path)
    hit = []
    try:
        for phase in PHASES:
            victim = _start(tmp_path)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and victim.poll() is None:
                if _in_phase(victim.pid, phase, study_dir, storage):
                    hit.append(phase)
                    break
                time.sleep(0.002 if phase == "checkpoint" else 0.05)
            else:
                time.sleep(rng.uniform(0, 2))  # not caught in time: a random moment
                hit.append("random")
            victim.kill()
            victim.wait()
        survivor.wait(timeout=400)
    finally:
        for process in (survivor,):
            if process.poll() is None:
                process.kill()
    # Resume: the same command, as a user would after the crashes.
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    print("kills:", hit)  # the phases caught vary from run to run; the invariants do not

    study = optuna.load_study(study_name="faults", storage=storage)
    trials = study.trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    settled = [t for t in trials if not (t.state == TrialState.FAIL and t.number in retried)]
    assert len(settled) >= N_TRIALS
    for trial in trials:
        if trial.state == TrialState.FAIL:
            assert TrialRecord.of(trial).fail_reason, trial.number

    front = front_of(trials)
    assert front
    for trial in front:
        assert checkpoint_path(study_dir, trial.number).exists(), trial.number
    table = pd.read_csv(study_dir / "pareto.csv")
    assert sorted(table.number) == sorted(t.number for t in front)
    assert len(pd.read_csv(study_dir / "trials.csv")) == len(trials)

    staging = re.compile(rf"^\..+\.{re.escape(socket.gethostname())}-\d+\.")
    left = [
        p
        for folder in (study_dir, study_dir / "checkpoints")
        for p in folder.iterdir()
        if staging.match(p.name)
    ]
    assert not left
