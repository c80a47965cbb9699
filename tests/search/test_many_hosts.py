"""Many hosts, one study, on a real PostgreSQL server: two "hosts" (two processes, each with
its own working folder, results folder and preprocessing cache) share the study and one
artifact folder. A candidate one host trained is continued by the other; each host exports
and retrains what the other trained; both report the same front; nothing is lost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas.search.record import StudyRecord, TrialRecord
from nas.search.results import pareto_front
from tests.conftest import run_cli, tiny_space_yaml, user_error, wait_for

pytestmark = pytest.mark.slow

# Heartbeats every second; a silent worker's trial failed after 10 s.
STUDY_EXTRAS = "  heartbeat: {heartbeat_interval: 1, grace_period: 10, retries: 1}\n"


def _host(tmp_path: Path, name: str, tiny_dataset: Path, n_trials: int, long: bool = False) -> Path:
    """A host's working folder with the space; its cache is its own (NAS_CACHE_DIR).
    `long`: a candidate's continuation trains 5 epochs of seconds, long enough to be caught
    in the middle; else the tiny space's trials of about a second."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    space = tiny_space_yaml(tiny_dataset, "hosts", n_trials, STUDY_EXTRAS)
    if long:
        space = space.replace("epochs: 2", "epochs: 8").replace(
            "batches_per_epoch: 3", "batches_per_epoch: 12"
        )
    (folder / "space.yaml").write_text(space)
    return folder


def _env(host: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]),
            "NAS_CACHE_DIR": str(host / "cache")}  # fmt: skip


def _nas(host: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """A short command on `host`: in this process (see conftest.run_cli), with the host's
    cache; the searches, which the test kills or runs side by side, get processes."""
    previous = os.environ.get("NAS_CACHE_DIR")
    os.environ["NAS_CACHE_DIR"] = str(host / "cache")
    try:
        return run_cli(module, *args, cwd=host)
    finally:
        if previous is None:
            del os.environ["NAS_CACHE_DIR"]
        else:
            os.environ["NAS_CACHE_DIR"] = previous


def _pid(trial) -> int:
    return int(TrialRecord.of(trial).worker.rsplit(":", 1)[1])


def test_two_hosts_share_a_study_through_postgres_and_an_artifact_folder(
    tmp_path, tiny_dataset, postgres_url
):
    store = tmp_path / "shared-artifacts"
    store.mkdir()
    a = _host(tmp_path, "host-a", tiny_dataset, n_trials=6, long=True)
    b = _host(tmp_path, "host-b", tiny_dataset, n_trials=6, long=True)
    run = ["-m", "nas.run", "space.yaml", "--storage", postgres_url, "--threads", "1"]

    # One connection for every look, made before host A creates the study's tables: opening
    # the storage anew each time took longer than an epoch on a loaded machine, and the looks
    # missed every continuation's middle.
    storage = optuna.storages.RDBStorage(postgres_url)
    # Host A trains until it is continuing a candidate (one epoch into the continuation),
    # and is killed there: its host is lost, with the candidate's state in the store.
    first = subprocess.Popen([sys.executable, *run, "--artifacts", str(store)], cwd=a,
                             env=_env(a), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)  # fmt: skip
    try:

        def continuing():
            try:
                study = optuna.load_study(study_name="hosts", storage=storage)
            except KeyError:
                return None
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                record = TrialRecord.of(trial)
                if record.continues is not None and 4 <= (record.epochs_run or 0) <= 7:
                    return trial  # 1 to 4 of 8 epochs left: killed in the middle
            return None

        victim = wait_for(continuing, 300, "host A continuing a candidate", first)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    parent = TrialRecord.of(victim).continues

    # Host B: the same command, no --artifacts (the study records the store). It reruns the
    # lost continuation from the state host A left in the store.
    second = subprocess.run([sys.executable, *run], cwd=b, env=_env(b), capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    study = optuna.load_study(study_name="hosts", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    assert _pid(by_number[parent]) == first.pid  # trained by host A ...
    reruns = [t for t in trials if TrialRecord.of(t).continues == parent
              and t.state == TrialState.COMPLETE]  # fmt: skip
    assert reruns and _pid(reruns[0]) not in (first.pid,)  # ... and continued by host B
    assert TrialRecord.of(reruns[0]).epochs_run > TrialRecord.of(by_number[parent]).epochs_run
    assert (b / "results/hosts/checkpoints").is_dir()
    assert StudyRecord.of(study).artifacts == f"file://{store}"

    # Both hosts search on together, to more candidates.
    more = [*run[1:], "--n-trials", "8"]
    together = [subprocess.Popen([sys.executable, "-m", *more], cwd=h, env=_env(h),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for h in (a, b)]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in together]
    assert [p.returncode for p in together] == [0, 0], outputs
    study = optuna.load_study(study_name="hosts", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(1 for t in trials if TrialRecord.of(t).continues is None
               and t.state == TrialState.COMPLETE) >= 8  # fmt: skip
    assert len({_pid(t) for t in trials if TrialRecord.of(t).worker}) >= 3

    # Each host exports the best member and retrains a front member the other host trained.
    front = {t.number for t in pareto_front(study)}
    for host in (a, b):
        exported = _nas(host, "nas.export", "results/hosts", "--best", "--storage",
                        postgres_url, "--out", "model", "--format", "none")  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        assert (host / "model/weights.pt").is_file()
    workers = {t.number: _pid(t) for t in trials if TrialRecord.of(t).worker}
    for host, other in ((a, b), (b, a)):
        theirs = [n for n in sorted(front) if not (host / f"results/hosts/checkpoints/"
                                                   f"trial_{n:04d}.pt").is_file()]  # fmt: skip
        number = (theirs or sorted(front))[0]
        retrained = _nas(host, "nas.retrain", "results/hosts", "--storage", postgres_url,
                         "--trials", str(number), "--epochs", "2")  # fmt: skip
        assert retrained.returncode == 0, retrained.stdout + retrained.stderr
        # The other host exports the weights this one retrained.
        exported = _nas(other, "nas.export", "results/hosts", "--trial", str(number),
                        "--weights", "retrained", "--storage", postgres_url, "--out",
                        f"retrained-{number}", "--format", "none")  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        assert (other / f"results/hosts/retrained/checkpoints/trial_{number:04d}.pt").is_file()
    assert workers  # every trial names its worker

    # The report on either host shows the study's front, with every member's overlay (those
    # the other host trained fetched from the store).
    for host in (a, b):
        reported = _nas(host, "nas.report", "results/hosts", "--storage", postgres_url)
        assert reported.returncode == 0, reported.stderr
        page = (host / "results/hosts/report.html").read_text()
        assert {int(n) for n in re.findall(r'alt="overlay of trial (\d+)"', page)} == front


def test_artifact_stores_that_cannot_be_used_are_refused(tmp_path, tiny_dataset):
    host = _host(tmp_path, "host", tiny_dataset, n_trials=1)
    cases = {
        str(tmp_path / "missing"): "is not there",
        "/proc": "cannot write to the artifact store",
        "s3://": "names no bucket",
        "ftp://server/x": "unknown kind of artifact store",
    }
    try:
        import boto3  # noqa: F401
    except ImportError:
        cases["s3://bucket/prefix"] = 'needs boto3: pip install -e ".[s3]"'
    for url, message in cases.items():
        result = run_cli("nas.run", "space.yaml", "--artifacts", url, cwd=host)
        assert result.returncode == 2, result.stderr
        assert message in user_error(result)
        assert not (host / "results").exists()  # nothing written: no study, no folder


def test_a_study_whose_store_is_gone_or_another_is_refused(tmp_path, tiny_dataset):
    host = _host(tmp_path, "host", tiny_dataset, n_trials=1)
    store, other = tmp_path / "store", tmp_path / "other"
    store.mkdir()
    other.mkdir()
    made = run_cli("nas.run", "space.yaml", "--artifacts", str(store), cwd=host)
    assert made.returncode == 0, made.stderr
    assert any((store / "hosts/checkpoints").glob("trial_*.pt"))  # the front's weights

    refused = run_cli("nas.run", "space.yaml", "--artifacts", str(other), cwd=host)
    assert refused.returncode == 2
    assert f"keeps its trial files in file://{store}" in user_error(refused)

    # A file in the store that is not what the study recorded is refused, not loaded.
    front = sorted((host / "results/hosts/checkpoints").glob("trial_*[0-9].pt"))
    for path in front:
        path.unlink()  # as on a host that never had them
    for uploaded in (store / "hosts/checkpoints").glob("trial_*.pt"):
        uploaded.write_bytes(uploaded.read_bytes()[:-1] + b"!")
    tampered = run_cli("nas.export", "results/hosts", "--best", cwd=host)
    assert "does not match the SHA-256 the study recorded for it" in user_error(tampered)
    assert not any(path.exists() for path in front)

    store.rename(tmp_path / "moved")
    for command in (("nas.run", "space.yaml"), ("nas.export", "results/hosts", "--best"),
                    ("nas.report", "results/hosts")):  # fmt: skip
        result = run_cli(*command, cwd=host)
        assert result.returncode == 2, (command, result.stderr)
        assert f"the artifact store {store} is not there" in user_error(result)


def test_a_shared_storage_without_a_store_says_so_in_one_line(tmp_path, tiny_dataset):
    host = _host(tmp_path, "host", tiny_dataset, n_trials=1)
    shared = run_cli("nas.run", "space.yaml", "--storage", "journal:///study.log", cwd=host)
    assert shared.returncode == 0, shared.stderr
    notes = [line for line in shared.stdout.splitlines() if "give the study a store" in line]
    assert len(notes) == 1 and "other hosts cannot continue, export or retrain" in notes[0]
    alone = run_cli("nas.run", "space.yaml", "--study-name", "alone", cwd=host)
    assert alone.returncode == 0, alone.stderr
    assert "give the study a store" not in alone.stdout
