"""Many workers through one storage proxy: `nas storage-proxy` serves a SQLite file (or a
PostgreSQL database) and `nas run`, `nas report` and `nas export` reach it as
`grpc://127.0.0.1:PORT`; a worker killed with SIGKILL loses no trial; what cannot work is
refused in one line with nothing written."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from nas.commands.storage_proxy import exposure_warning
from nas.network.model_card import read_card
from nas.search.liveness import settle_orphans, worker_id
from nas.search.record import TrialRecord, write
from nas.search.results import pareto_front
from nas.search.storage import HeartbeatConfig, load_study, open_storage
from tests.conftest import (
    POSTGRES_PASSWORD,
    _free_port,
    require_module,
    run_cli,
    tiny_space_yaml,
    user_error,
    wait_for,
)

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}


def _start_proxy(storage: str, port: int, *options: str) -> tuple[subprocess.Popen, str]:
    """`nas storage-proxy` serving `storage` on `port`, and the line it printed once it
    serves (the storage URL in the environment, as a user keeps a password off `ps`)."""
    require_module("grpc", "grpcio is not installed (.[grpc])")
    command = [sys.executable, "-m", "nas", "storage-proxy", "--port", str(port), *options]
    proxy = subprocess.Popen(command, env=ENV | {"NAS_STORAGE": storage}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    line = proxy.stdout.readline()
    if not line:
        pytest.fail(f"the storage proxy did not start: {proxy.communicate()}")
    return proxy, line


def _stop(proxy: subprocess.Popen, signum: int = signal.SIGTERM) -> int:
    proxy.send_signal(signum)
    try:
        return proxy.wait(timeout=30)
    finally:
        if proxy.poll() is None:
            proxy.kill()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """(the proxy's grpc:// URL, the SQLite URL of the file it serves)."""
    database = f"sqlite:///{tmp_path_factory.mktemp('proxied') / 'study.db'}"
    port = _free_port()
    proxy, _ = _start_proxy(database, port)
    yield f"grpc://127.0.0.1:{port}", database
    _stop(proxy)


def _front_of_report(report: Path) -> set[int]:
    """The trial numbers of report.html's front table (the first table, number first)."""
    table = report.read_text().split('<table class="dataframe">', 1)[1].split("</table>")[0]
    return {int(n) for n in re.findall(r"<tr>\s*<td>(\d+)</td>", table)}


def _settled(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    trials = study.trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return [t for t in trials if t.state == TrialState.COMPLETE]


def test_workers_search_through_the_proxy_and_report_and_export_read_its_front(
    tmp_path, tiny_dataset, proxied, monkeypatch
):
    grpc_url, database = proxied
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, "many", n_trials=2))
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])  # for the workers it starts
    result = run_cli("nas.run", "space.yaml", "--storage", grpc_url, "--workers", "2",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    study = load_study(database, "many")  # the file behind the proxy, read directly
    assert len(_settled(study)) == 2
    # Run by the workers it started, each its own client of the proxy.
    workers = {TrialRecord.of(t).worker for t in study.trials}
    assert None not in workers and worker_id() not in workers
    # No Optuna heartbeat through a proxy: nas recorded its own on every trial.
    assert all(TrialRecord.of(t).heartbeat_at for t in study.trials)
    front = {t.number for t in pareto_front(study)}
    results = tmp_path / "results" / "many"
    assert set(pd.read_csv(results / "pareto.csv").number) == front

    (results / "report.html").unlink()
    report = run_cli("nas.report", "results/many", "--storage", grpc_url, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert _front_of_report(results / "report.html") == front
    exports = {}
    for storage in (grpc_url, database):
        exported = run_cli("nas.export", "results/many", "--best", "--format", "none", "--out",
                           f"model-{len(exports)}", "--storage", storage, cwd=tmp_path)  # fmt: skip
        assert exported.returncode == 0, exported.stderr
        exports[storage] = read_card(tmp_path / f"model-{len(exports)}").source["trial"]
    assert exports[grpc_url] == exports[database] and exports[grpc_url] in front


def test_a_worker_killed_on_the_proxy_has_its_trial_failed_and_rerun(
    tmp_path, tiny_dataset, proxied
):
    # One candidate of 8 epochs, long enough to kill it in the middle; the grace period far
    # longer than the test: the dead worker is this host's process, recognised as dead at once.
    grpc_url, database = proxied
    extra = (
        "  heartbeat: {heartbeat_interval: 1, grace_period: 600, retries: 1}\n"
        "  fidelity: {type: none}\n"
    )
    space = tiny_space_yaml(tiny_dataset, "killed", 1, extra)
    space = space.replace("epochs: 2", "epochs: 8").replace(
        "batches_per_epoch: 3", "batches_per_epoch: 4"
    )
    (tmp_path / "space.yaml").write_text(space)
    command = [sys.executable, "-m", "nas.run", "space.yaml", "--storage", grpc_url]
    run = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def trial_in_training():
        try:
            trials = load_study(database, "killed").trials
        except Exception:  # not created yet
            return None
        running = [
            t
            for t in trials
            if t.state == TrialState.RUNNING and (TrialRecord.of(t).epochs_run or 0) >= 1
        ]
        return running[0] if running else None

    try:
        victim = wait_for(trial_in_training, 240, "a trial's first epoch", run)
        run.kill()
        run.wait()
    finally:
        if run.poll() is None:
            run.kill()
    assert TrialRecord.of(victim).heartbeat_at is not None  # nas's own heartbeat ran
    result = run_cli("nas.run", *command[3:], cwd=tmp_path)  # the same command again
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"trial(s) {victim.number} lost their worker" in result.stdout
    study = load_study(database, "killed")
    dead = study.trials[victim.number]
    assert dead.state == TrialState.FAIL and TrialRecord.of(dead).fail_reason.endswith("died")
    (rerun,) = _settled(study)  # the killed candidate, run again to its end
    assert TrialRecord.of(rerun).retry_of == victim.number and rerun.params == dead.params


def test_a_trial_of_another_host_is_failed_and_rerun_once_its_heartbeat_is_silent(proxied):
    """Optuna keeps no heartbeat through a proxy: the one nas records on the trial decides."""
    grpc_url, database = proxied
    study = optuna.create_study(storage=open_storage(grpc_url), study_name="silent")
    silent, beating = study.ask({"x": FloatDistribution(0, 1)}), study.ask()
    write(silent, worker="elsewhere:1", heartbeat_at=time.time() - 60)
    write(beating, worker="elsewhere:2", heartbeat_at=time.time())
    settled = settle_orphans(study, HeartbeatConfig(heartbeat_interval=1, grace_period=30))
    assert settled.failed == (silent.number,)
    assert [t.number for t in settled.elsewhere] == [beating.number]
    trials = load_study(database, "silent").trials
    assert TrialRecord.of(trials[silent.number]).fail_reason == (
        "its worker sent no heartbeat for 30 s"
    )
    (rerun,) = [t for t in trials if t.state == TrialState.WAITING]
    assert TrialRecord.of(rerun).retry_of == silent.number
    assert rerun.system_attrs["fixed_params"] == silent.params  # enqueued with them


def test_a_proxy_over_postgres_hides_the_password_and_serves_a_search(
    tmp_path, tiny_dataset, postgres_url
):
    port = _free_port()
    proxy, line = _start_proxy(postgres_url, port)
    try:
        assert line.strip() == (
            f"storage proxy for {postgres_url.replace(POSTGRES_PASSWORD, '***')} "
            f"on grpc://127.0.0.1:{port}"
        )
        (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=2))
        grpc_url = f"grpc://127.0.0.1:{port}"
        result = run_cli("nas.run", "space.yaml", "--storage", grpc_url, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(_settled(optuna.load_study(study_name="tiny", storage=postgres_url))) == 2
    finally:
        code = _stop(proxy)
    assert code == 143  # SIGTERM, as the other commands exit on it
    assert POSTGRES_PASSWORD not in proxy.stdout.read() + proxy.stderr.read()


def test_ctrl_c_stops_the_proxy(tmp_path):
    proxy, _ = _start_proxy(f"sqlite:///{tmp_path / 'study.db'}", _free_port())
    assert _stop(proxy, signal.SIGINT) == 130
    assert proxy.stderr.read().strip() == "storage proxy stopped; the study stays in its storage"


# --- refused, in one line, with nothing written ------------------------------------------
# (`tiny_cases`: the dataset's cache built first, so that a run prints nothing but its error)


@pytest.mark.parametrize(
    "url, reason",
    [
        ("grpc://127.0.0.1", "names no port"),
        ("grpc://127.0.0.1:http", "'http' is not a port (1-65535)"),
        ("grpc://127.0.0.1:70000", "'70000' is not a port (1-65535)"),
        ("grpc://127.0.0.1:0", "'0' is not a port (1-65535)"),
    ],
)
def test_a_grpc_url_without_a_port_is_refused(tmp_path, tiny_dataset, tiny_cases, url, reason):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    line = user_error(run_cli("nas.run", "space.yaml", "--storage", url, cwd=tmp_path))
    assert line.startswith(f"error: {url}: {reason}")
    assert not (tmp_path / "results").exists()


def test_a_grpc_url_where_no_proxy_answers_is_refused(tmp_path, tiny_dataset, tiny_cases):
    require_module("grpc", "grpcio is not installed (.[grpc])")
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    port = _free_port()  # nothing listens there
    url = f"grpc://127.0.0.1:{port}"
    line = user_error(run_cli("nas.run", "space.yaml", "--storage", url, cwd=tmp_path))
    assert line.startswith(f"error: {url}: no storage proxy answers there")
    assert f"nas storage-proxy --storage URL --port {port}" in line
    assert not (tmp_path / "results").exists()


def test_without_grpcio_the_extra_to_install_is_named(
    tmp_path, tiny_dataset, tiny_cases, monkeypatch
):
    monkeypatch.setitem(sys.modules, "grpc", None)  # `import grpc` fails, as without grpcio
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    url = f"grpc://127.0.0.1:{_free_port()}"
    line = user_error(run_cli("nas.run", "space.yaml", "--storage", url, cwd=tmp_path))
    assert line == f'error: {url}: needs grpcio: pip install -e ".[grpc]"'
    assert not (tmp_path / "results").exists()
    database = f"sqlite:///{tmp_path / 'study.db'}"
    served = run_cli("nas.storage_proxy", "--storage", database, "--port", str(_free_port()),
                     cwd=tmp_path)  # fmt: skip
    assert user_error(served) == 'error: nas storage-proxy: needs grpcio: pip install -e ".[grpc]"'
    assert not (tmp_path / "study.db").exists()


def test_the_proxy_refuses_a_proxy_a_journal_a_bad_or_used_port_and_a_bad_storage(tmp_path):
    require_module("grpc", "grpcio is not installed (.[grpc])")
    database = tmp_path / "study.db"
    port = _free_port()

    def refusal(*args: str) -> str:
        return user_error(run_cli("nas.storage_proxy", *args, cwd=tmp_path))

    served = refusal("--storage", f"grpc://127.0.0.1:{port}", "--port", str(port))
    assert served.startswith(f"error: grpc://127.0.0.1:{port}: is a storage proxy")
    journal = f"journal:///{tmp_path / 'study.log'}"
    line = refusal("--storage", journal, "--port", str(port))
    assert line.startswith(f"error: {journal}: Optuna's storage proxy does not serve a journal")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        used = listener.getsockname()[1]
        line = refusal("--storage", f"sqlite:///{database}", "--port", str(used))
    assert line == f"error: --port: {used} is in use on 127.0.0.1"
    bad = run_cli("nas.storage_proxy", "--storage", f"sqlite:///{database}", "--port", "70000",
                  cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2  # a usage error: what is wrong, then where the options are
    assert bad.stderr.splitlines()[0].endswith("argument --port: 70000 is not a port (1-65535)")
    (tmp_path / "a-file").write_text("")
    inside_a_file = f"sqlite:///{tmp_path / 'a-file' / 'study.db'}"
    line = refusal("--storage", inside_a_file, "--port", str(port))
    assert line.startswith(f"error: {inside_a_file}: cannot open the study storage")
    assert refusal("--port", str(port)).startswith("error: --storage: is required")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_proxy_on_another_address_than_loopback_is_served_with_a_warning():
    assert exposure_warning("127.0.0.1", 13000) is None
    warning = exposure_warning("0.0.0.0", 13000)
    assert warning.startswith("warning: --host '0.0.0.0' is not a loopback address")
    assert "port 13000 can change or delete every study" in warning
