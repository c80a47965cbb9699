"""Inspecting a finished search as a person would: optuna-dashboard over HTTP, and report.html
and the dashboard in headless Chromium."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest

from nas.commands.dashboard import exposure_warning
from nas.search.record import TrialRecord
from tests.conftest import require, require_module, run_cli, tiny_space_yaml

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What headless Chromium needs on a machine with a closed network (see .ci/run).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dataset) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    (root / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=4))
    result = run_cli("nas.run", "space.yaml", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "results" / "tiny"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.fixture(scope="module")
def dashboard(finished):
    """`python -m nas.dashboard` on a free loopback port; yields its base URL."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "nas.dashboard", str(finished), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_served(server, url)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def _wait_until_served(server: subprocess.Popen, url: str) -> None:
    for _ in range(120):
        try:
            _get(url + "/api/meta")
            return
        except OSError:
            assert server.poll() is None, server.communicate()
            time.sleep(0.5)
    pytest.fail("optuna-dashboard did not answer within 60 s")


@pytest.mark.parametrize(
    ("host", "warns"),
    [
        ("127.0.0.1", False), ("127.0.0.2", False), ("localhost", False), ("::1", False),
        ("0.0.0.0", True), ("", True), ("::", True), ("192.168.1.20", True),
        ("dashboard.example.org", True),
    ],
)  # fmt: skip
def test_only_a_loopback_host_goes_without_a_warning(host, warns):
    warning = exposure_warning(host, 8080)
    assert (warning is not None) == warns
    if warns:
        assert "\n" not in warning and "delete" in warning and "8080" in warning


def test_dashboard_on_every_interface_warns_once_that_anyone_can_change_the_study(finished):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "nas.dashboard", str(finished), "--port", str(port),
         "--host", "0.0.0.0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_until_served(server, f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        stdout, stderr = server.communicate(timeout=10)
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "delete the study" in warnings[0], stderr
    assert f"http://0.0.0.0:{port}/" in stdout


def test_every_trial_has_a_note_curve_and_overlay_and_the_front_its_weights(finished):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{finished / 'study.db'}")
    front = {t.number for t in study.best_trials}
    assert front
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert TrialRecord.of(trial).quantity("macs") > 0 and TrialRecord.of(trial).summary
        assert (finished / "overlays" / f"trial_{trial.number:04d}.png").exists()
    report = (finished / "report.html").read_text()
    assert "Pareto front" in report and "data:image/png;base64," in report
    # Self-contained: plotly.js is embedded, nothing is fetched from elsewhere.
    assert "<script src=" not in report and 'src="http' not in report and "Plotly" in report


def test_dashboard_serves_the_study_notes_curves_and_artifacts(finished, dashboard):
    studies = json.loads(_get(dashboard + "/api/studies"))["study_summaries"]
    (entry,) = [s for s in studies if s["study_name"] == "tiny"]
    detail = json.loads(_get(f"{dashboard}/api/studies/{entry['study_id']}"))
    assert len(detail["trials"]) == 4
    front = {t["number"] for t in detail["best_trials"]}
    for trial in detail["trials"]:
        if trial["state"] != "Complete":
            continue
        assert f"## Trial {trial['number']}:" in trial["note"]["body"]
        assert "parameters" in trial["note"]["body"] and "| stage |" in trial["note"]["body"]
        assert trial["intermediate_values"], "the learning curve"
        names = {a["filename"]: a for a in trial["artifacts"]}
        overlay = names[f"trial_{trial['number']:04d}.png"]
        served = _get(
            f"{dashboard}/artifacts/{entry['study_id']}/{trial['trial_id']}/{overlay['artifact_id']}"
        )
        assert served.startswith(b"\x89PNG")
        if trial["number"] in front:
            weights = names[f"trial_{trial['number']:04d}.pt"]
            served = _get(
                f"{dashboard}/artifacts/{entry['study_id']}/{trial['trial_id']}/"
                f"{weights['artifact_id']}"
            )
            checkpoint = finished / "checkpoints" / f"trial_{trial['number']:04d}.pt"
            assert served == checkpoint.read_bytes()


def test_report_command_rewrites_the_report(finished):
    report = finished / "report.html"
    report.unlink()
    result = run_cli("nas.report", str(finished), cwd=finished)
    assert result.returncode == 0, result.stderr
    assert report.exists()
    error = run_cli("nas.report", str(finished / "nope"), cwd=finished)
    assert error.returncode == 2 and "Traceback" not in error.stderr


@pytest.fixture(scope="module")
def browser():
    require(
        CHROMIUM is not None,
        "Chromium is not installed (Debian package chromium; .ci/run installs it)",
    )
    playwright_api = require_module("playwright.sync_api", "playwright is not installed (.[dev])")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_report_renders_the_front_in_chromium(finished, browser):
    page = browser.new_page()
    page.goto((finished / "report.html").as_uri())
    # Plotly draws each point as an SVG path of class "point"; the front is the first plot.
    page.wait_for_selector(".js-plotly-plot .scatterlayer path.point", timeout=30_000)
    first_plot = page.locator(".js-plotly-plot").first
    assert "Pareto front" in first_plot.inner_text()
    assert first_plot.locator("path.point").count() >= 1
    page.close()


def test_dashboard_draws_the_pareto_front_in_chromium(finished, dashboard, browser):
    studies = json.loads(_get(dashboard + "/api/studies"))["study_summaries"]
    (entry,) = [s for s in studies if s["study_name"] == "tiny"]
    page = browser.new_page()
    page.goto(f"{dashboard}/dashboard/studies/{entry['study_id']}")
    page.wait_for_selector("#graph-pareto-front path.point", timeout=60_000)
    assert page.locator("#graph-pareto-front path.point").count() >= 1
    # The front's learning curves, published as a plot of the study (a line per member).
    curves = '[id="user-defined-plot:learning-curves"]'
    page.wait_for_selector(f"{curves} path.js-line", timeout=30_000)
    members = len(pd.read_csv(finished / "pareto.csv"))
    assert page.locator(f"{curves} .scatterlayer .trace").count() == members
    # A completed trial's page: its note, its per-epoch values and its overlay image.
    detail = json.loads(_get(f"{dashboard}/api/studies/{entry['study_id']}"))
    number = next(t["number"] for t in detail["trials"] if t["state"] == "Complete")
    page.goto(f"{dashboard}/dashboard/studies/{entry['study_id']}/trials?numbers={number}")
    page.get_by_text(f"Trial {number}:").first.wait_for(timeout=30_000)
    page.wait_for_selector('img[src^="/artifacts/"]', timeout=30_000)
    assert page.get_by_text("multiply-accumulates").count() >= 1
    assert page.get_by_text("Intermediate Values").count() >= 1
    page.close()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_an_overlay_predicts_only_the_slice_it_shows(tiny_cases, spatial_dims):
    import numpy as np
    import torch

    from nas import build_unet
    from nas.data.labels import LabelScheme
    from nas.network.windows import predict_case
    from nas.search.artifacts import _shown_prediction

    scheme = LabelScheme(("lesion",), (0, 1))
    model = build_unet(spatial_dims=spatial_dims, depth=2, base_channels=4).eval()
    patch = (32, 32) if spatial_dims == 2 else (32, 32, 8)
    case, cpu = tiny_cases[0], torch.device("cpu")
    whole = predict_case(model, case, scheme, patch, cpu, slice_axis=2)
    for index in (0, 7, case.label.shape[2] - 1):
        shown = _shown_prediction(model, case, scheme, patch, cpu, 2, index)
        assert shown.shape == whole[:, :, index].shape
        if spatial_dims == 2:  # the very slice the whole case's prediction holds
            assert np.array_equal(shown, whole[:, :, index])
        else:  # a slab of one patch's depth around it, windows blended over fewer neighbours
            assert set(np.unique(shown)) <= {0, 1}
