"""No storage password on disk or in an error: every command, given a PostgreSQL URL that
holds the password, prints it nowhere and writes it nowhere (the results folder, the export,
run.log, the study's attrs), on success and on every error that names the storage; and the
scrubbing itself, on texts and files."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from nas.commands.cli import exit_code
from nas.core import secrets
from nas.core.errors import NasError
from nas.core.secrets import redact, register, scrub
from nas.core.staging import atomic_write, replace_folder, staging_folder
from tests.conftest import POSTGRES_PASSWORD, run_cli, tiny_space_yaml

ROOT = Path(__file__).resolve().parents[2]
WRONG_PASSWORD = "Wrong-Pass-9876"


@pytest.fixture
def forget_passwords(monkeypatch):
    """No password registered by an earlier test of this process."""
    monkeypatch.setattr(secrets, "_registered", set())


# --- the scrubbing ----------------------------------------------------------------------


def test_a_registered_password_is_hidden_in_its_url_alone_and_percent_decoded(
    forget_passwords,
):
    register("postgresql+psycopg://nas:p%40ss-Word@db/nas")
    text = scrub("postgresql+psycopg://nas:p%40ss-Word@db/nas: auth failed, password=p@ss-Word")
    assert text == "postgresql+psycopg://nas:***@db/nas: auth failed, password=***"
    assert scrub("p@ss-Word and p%40ss-Word") == "*** and ***"
    assert scrub("http://host:8080/a?x=1 and mail@example.org") == (
        "http://host:8080/a?x=1 and mail@example.org"
    )


def test_an_unregistered_urls_password_and_a_short_one_are_hidden_only_in_a_url(
    forget_passwords,
):
    assert redact("mysql+pymysql://u:abc@h/db?password=xyz&ssl=1") == (
        "mysql+pymysql://u:***@h/db?password=***&ssl=1"
    )
    register("postgresql://u:a b@h/db")  # 3 characters: words such as "a b" stay
    assert scrub("--storage 'postgresql://u:a b@h/db' (a b)") == (
        "--storage 'postgresql://u:***@h/db' (a b)"
    )
    assert scrub("host=h password=hunter2 dbname=x") == "host=h password=*** dbname=x"


def test_errors_and_text_files_hide_a_registered_password(forget_passwords, tmp_path):
    register(f"postgresql://nas:{POSTGRES_PASSWORD}@db/nas")
    error = NasError("db", f"the driver said {POSTGRES_PASSWORD!r}")
    assert POSTGRES_PASSWORD not in str(error) and "***" in error.reason
    atomic_write(tmp_path / "table.csv", lambda p: p.write_text(f"reason\n{POSTGRES_PASSWORD}\n"))
    atomic_write(tmp_path / "weights.bin", lambda p: p.write_bytes(POSTGRES_PASSWORD.encode()))
    assert (tmp_path / "table.csv").read_text() == "reason\n***\n"
    assert (tmp_path / "weights.bin").read_bytes() == POSTGRES_PASSWORD.encode()  # not text
    with staging_folder(tmp_path / "model") as staging:
        (staging / "README.md").write_text(f"from {POSTGRES_PASSWORD}")
        replace_folder(staging, tmp_path / "model")
    assert (tmp_path / "model" / "README.md").read_text() == "from ***"


def test_what_a_command_prints_logs_and_dies_of_hides_the_password(forget_passwords, capsys):
    url = f"postgresql://nas:{POSTGRES_PASSWORD}@db/nas"
    optuna_log, stream = logging.getLogger("optuna"), io.StringIO()
    handler = logging.StreamHandler(stream)  # as Optuna's own: holds its stream from the start

    def run(args: argparse.Namespace) -> int:
        print(f"printed {POSTGRES_PASSWORD}")
        try:
            raise ValueError(f"the driver quotes {url}")
        except ValueError:
            optuna_log.error("trial failed: %s", POSTGRES_PASSWORD, exc_info=True)
        raise RuntimeError(f"a bug quoting {POSTGRES_PASSWORD}")

    optuna_log.addHandler(handler)
    try:
        with pytest.raises(RuntimeError) as raised:
            exit_code(run, argparse.Namespace(storage=url))
    finally:
        optuna_log.removeHandler(handler)
    sys.excepthook(raised.type, raised.value, raised.tb)  # as the interpreter would at exit
    out, err = capsys.readouterr()
    assert out == "printed ***\n"
    assert "RuntimeError: a bug quoting ***" in err and POSTGRES_PASSWORD not in err
    logged = stream.getvalue()
    assert "trial failed: ***" in logged and POSTGRES_PASSWORD not in logged
    assert "ValueError: the driver quotes postgresql://nas:***@db" in logged


# --- every command, with a real PostgreSQL storage --------------------------------------


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """run_cli with nothing registered by earlier commands of this test: each command finds
    the password itself, as in a process of its own."""
    secrets._registered.clear()
    return run_cli(module, *args, cwd=cwd)


def _shows_no_password(result: subprocess.CompletedProcess, *passwords: str) -> None:
    shown = result.stdout + result.stderr
    for password in (POSTGRES_PASSWORD, *passwords):
        assert password not in shown, shown


def _files_holding(root: Path, text: str, skip: set[Path]) -> list[Path]:
    return [
        path
        for path in sorted(root.rglob("*"))
        if path.is_file() and path not in skip and text.encode() in path.read_bytes()
    ]


def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    _shows_no_password(result, WRONG_PASSWORD)
    return result.stderr


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_dataset, postgres_server):
    """A 2-trial search in a PostgreSQL database, given by --storage: (folder, URL, result)."""
    root = tmp_path_factory.mktemp("secrets")
    url = postgres_server()
    (root / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=2))
    result = _cli("nas.run", "space.yaml", "--storage", url, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, url, result


@pytest.mark.slow
def test_a_search_and_everything_after_it_leave_the_password_nowhere(
    searched, tiny_dataset, monkeypatch
):
    root, url, run = searched
    results = root / "results" / "tiny"
    _shows_no_password(run)
    assert "nas:***@127.0.0.1" in run.stdout  # the storage was named, hidden
    first_line = (results / "run.log").read_text().splitlines()[0]
    assert "--storage postgresql+psycopg://nas:***@127.0.0.1" in first_line

    monkeypatch.setenv("NAS_STORAGE", url)  # one more trial, the URL from the environment
    more = _cli("nas.run", "space.yaml", "--n-trials", "3", cwd=root)
    assert more.returncode == 0 and "3 completed trials" in more.stdout, more.stderr
    _shows_no_password(more)
    monkeypatch.delenv("NAS_STORAGE")

    short = ("--epochs", "1", "--batches-per-epoch", "1")
    for how in (("--trials", "0", *short), ("--trials", "0", "--all-cases", *short),
                ("--trials", "0", "--folds", "0", "--epochs", "1")):  # fmt: skip
        retrained = _cli("nas.retrain", "results/tiny", *how, "--storage", url, cwd=root)
        assert retrained.returncode == 0, retrained.stdout + retrained.stderr
        assert "nas:***@127.0.0.1" in retrained.stdout
        _shows_no_password(retrained)
    export = _cli("nas.export", "results/tiny", "--best", "--format", "none", "--storage", url,
                  "--out", "model", cwd=root)  # fmt: skip
    assert export.returncode == 0, export.stdout + export.stderr
    assert "nas:***@127.0.0.1" in (root / "model" / "architecture.yaml").read_text()
    scan = str(sorted((tiny_dataset / "imagesTr").glob("*.nii.gz"))[0])
    predict = _cli("nas.predict", "model", scan, "mask.nii.gz", cwd=root)
    assert predict.returncode == 0 and (root / "mask.nii.gz").exists(), predict.stderr
    report = _cli("nas.report", "results/tiny", "--storage", url, cwd=root)
    assert report.returncode == 0 and (results / "report.html").exists(), report.stderr
    for result in (export, predict, report):
        _shows_no_password(result)

    assert (results / "retrained.csv").exists() and (results / "crossval.csv").exists()
    assert _files_holding(root, POSTGRES_PASSWORD, skip={root / "space.yaml"}) == []
    for name in ("tiny", "tiny-retrain", "tiny-crossval"):
        study = optuna.load_study(study_name=name, storage=url)
        attrs = [study.user_attrs]
        attrs += [[t.user_attrs, t.system_attrs] for t in study.get_trials(deepcopy=False)]
        assert POSTGRES_PASSWORD not in json.dumps(attrs, default=str)


@pytest.mark.slow
def test_the_dashboards_startup_lines_hide_the_password(searched):
    root, url, _ = searched
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "nas.dashboard", "results/tiny", "--storage", url,
         "--port", str(port)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        for _ in range(120):  # until it serves: its startup lines are printed by then
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=10).close()
                break
            except OSError:
                assert server.poll() is None, server.communicate()
                time.sleep(0.5)
    finally:
        server.terminate()
        shown = server.communicate(timeout=10)[0]
    assert f"optuna-dashboard for results/tiny on http://127.0.0.1:{port}/" in shown
    assert POSTGRES_PASSWORD not in shown, shown


@pytest.mark.slow
def test_every_error_that_names_the_storage_hides_the_password(searched, tiny_dataset):
    root, url, _ = searched
    wrong = url.replace(POSTGRES_PASSWORD, WRONG_PASSWORD)
    host, port = "127.0.0.1", url.split("@127.0.0.1:")[1].split("/")[0]
    unreachable = url.replace(f"{host}:{port}", f"{host}:1")  # nothing listens on port 1
    in_query = url.replace(f":{POSTGRES_PASSWORD}@", "@") + f"?password={POSTGRES_PASSWORD}"
    optuna.create_study(study_name="bare", storage=url)  # not a search of nas: no data settings
    (root / "other.yaml").write_text(
        tiny_space_yaml(tiny_dataset, n_trials=2, extra="  objectives: [case_dice, params]\n")
    )

    assert "has no study named 'other'" in _error(
        _cli("nas.retrain", "results/other", "--storage", url, cwd=root)
    )
    assert "has no study named 'other'" in _error(
        _cli("nas.export", "results/other", "--storage", url, cwd=root)
    )
    assert "does not record its data settings" in _error(
        _cli("nas.retrain", "results/bare", "--storage", url, cwd=root)
    )
    assert "password authentication failed" in _error(
        _cli("nas.report", "results/tiny", "--storage", wrong, cwd=root)
    )
    assert "cannot open the study storage" in _error(
        _cli("nas.export", "results/tiny", "--storage", unreachable, cwd=root)
    )
    assert "was created with objectives ['iou', 'params']" in _error(
        _cli("nas.run", "other.yaml", "--study-name", "tiny", "--storage", url, cwd=root)
    )
    assert "password=***" in _error(
        _cli("nas.report", "results/other", "--storage", in_query, cwd=root)
    )
    skip = {root / "space.yaml", root / "other.yaml"}
    assert _files_holding(root, POSTGRES_PASSWORD, skip) == []
    assert _files_holding(root, WRONG_PASSWORD, skip) == []
