"""Objectives and constraints as data: the table, k-objective fronts and hypervolume, the
YAML's bad inputs, a three-objective search with a constraint on the embedded data, and a
study written by an earlier release."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from nas.network.builder import UNetConfig, build_unet
from nas.network.model_card import read_card
from nas.search.measure import FEW_REPEATS, MAX_REPEATS, measure_latency
from nas.search.objectives import Bound, hypervolume, non_dominated, rejection, violations
from nas.search.record import StudyRecord, TrialRecord, study_objectives, write_study
from tests.conftest import run_cli, tiny_space_yaml

FIXTURE = Path(__file__).parents[1] / "fixtures" / "v1"


def test_hypervolume_is_exact_in_two_and_three_objectives():
    # Two points, every column minimised, reference (1, 1): 0.8 x 0.5 + 0.5 x 0.3.
    assert hypervolume(np.array([[0.2, 0.5], [0.5, 0.2]]), np.ones(2)) == pytest.approx(0.55)
    # A cube of 0.5^3 and a slab 1 x 0.1 x 0.1 that overlaps it by 0.5 x 0.1 x 0.1.
    points = np.array([[0.5, 0.5, 0.5], [0.0, 0.9, 0.9]])
    assert hypervolume(points, np.ones(3)) == pytest.approx(0.125 + 0.01 - 0.005)
    # A dominated point and one outside the reference add nothing.
    more = np.vstack([points, [0.6, 0.6, 0.6], [0.1, 0.1, 1.5]])
    assert hypervolume(more, np.ones(3)) == pytest.approx(0.13)


def test_fronts_and_constraints_follow_the_table():
    names = ["iou", "params", "latency_ms"]
    points = np.array([[0.8, 1e5, 9.0], [0.7, 1e4, 9.0], [0.7, 1e5, 2.0], [0.6, 1e5, 9.0]])
    # The last is dominated by the first (worse IoU, same cost); the others trade off.
    assert non_dominated(points, names).tolist() == [True, True, True, False]
    constraints = {"params": Bound(max=2e4), "iou": Bound(min=0.5)}
    quantities = {"iou": 0.7, "params": 3e4}
    assert violations(quantities, constraints) == pytest.approx([-0.2, 1e4])  # iou, params
    assert rejection(quantities, constraints) == "params 3e+04 > max 2e+04"
    assert rejection({"params": 1e4}, constraints) == ""  # an unknown IoU breaks nothing
    with pytest.raises(ValueError, match="max"):
        Bound(min=5, max=1)


@pytest.mark.parametrize(
    ("study_section", "message"),
    [
        ("objectives: [iou, flops]", "study.objectives.1: unknown objective 'flops' (known: iou,"),
        ("objectives: [iou]", "give 2 or 3 objectives, not 1"),
        ("objectives: [iou, dice, params, macs]", "give 2 or 3 objectives, not 4"),
        ("objectives: [params, macs]", "needs a score to maximise"),
        ("constraints: {weight: {max: 3}}", "study.constraints.weight"),
        ("constraints: {params: {min: 10, max: 2}}", "max (2) is below min (10)"),
        ("latency: {device: gpu7}", "study.latency.device"),
    ],
)
def test_bad_objectives_and_constraints_exit_2_naming_the_key(
    tmp_path, tiny_dataset, study_section, message
):
    (tmp_path / "space.yaml").write_text(
        tiny_space_yaml(tiny_dataset, extra=f"  {study_section}\n")
    )
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: space.yaml: ") and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()  # refused before anything was written


def test_latency_is_the_median_of_repeats_until_the_spread_is_small():
    model = build_unet(UNetConfig(spatial_dims=2, depth=2, base_channels=4))
    latency = measure_latency(model, (32, 32), 1, torch.device("cpu"), threads=1)
    assert latency.median_ms > 0 and latency.iqr_ms >= 0
    assert FEW_REPEATS <= latency.repeats <= MAX_REPEATS  # a small 2D network: ms a pass
    assert model.training  # left as it was found


def _non_dominated_from_storage(study: optuna.Study, names: list[str]) -> set[int]:
    """The front computed from the storage's own values, independently of nas.search.results."""
    done = [t for t in study.get_trials(states=(TrialState.COMPLETE,))]
    superseded = {
        TrialRecord.of(t).continues for t in done if TrialRecord.of(t).continues is not None
    }
    done = [t for t in done if t.number not in superseded]
    signs = np.array([-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0
                      for d in study.directions])  # fmt: skip
    low = np.array([t.values for t in done]) * signs
    keep = set()
    for i, point in enumerate(low):
        dominated = any((other <= point).all() and (other < point).any() for other in low)
        if not dominated:
            keep.add(done[i].number)
    return keep


def test_a_three_objective_search_with_a_constraint(tmp_path, tiny_dataset):
    extra = (
        "  objectives: [iou, params, latency_ms]\n"
        "  constraints: {params: {max: 3000}}\n"
        "  latency: {device: cpu, threads: 1}\n"
    )
    space = tmp_path / "space.yaml"
    text = tiny_space_yaml(tiny_dataset, n_trials=6, extra=extra)
    space.write_text(text.replace("sampler: random", "sampler: tpe"))  # one told constraints
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{tmp_path}/results/tiny/study.db"
    )
    assert study_objectives(study).names == ["iou", "params", "latency_ms"]
    assert len(study.directions) == 3
    trials = study.get_trials()
    records = [TrialRecord.of(t) for t in trials]
    rejected = [r for r in records if r.rejected]
    trained = [r for r in records if r.epochs_run is not None]
    # Candidates above the limit were rejected before training: no epoch, no step, no
    # weights; the sampler was told (Optuna's constraints, > 0: infeasible).
    assert rejected, "the space's 3-stage networks exceed 3,000 parameters: some must be"
    for record, trial in zip(records, trials, strict=True):
        if record.rejected:
            assert record.state == TrialState.PRUNED and record.n_params > 3000
            assert "steps" not in trial.user_attrs and not trial.intermediate_values
            assert trial.constraints and max(trial.constraints.values()) > 0
    assert trained and all(r.n_params <= 3000 for r in trained)
    assert all(r.quantity("latency_ms") > 0 and r.latency_iqr_ms is not None for r in trained)
    # pareto.csv is the non-dominated set of the storage's values over all three objectives.
    front = pd.read_csv(tmp_path / "results/tiny/pareto.csv")
    assert set(front["number"]) == _non_dominated_from_storage(
        study, ["iou", "params", "latency_ms"]
    )
    assert front["latency_ms"].notna().all()
    report = (tmp_path / "results/tiny/report.html").read_text()
    assert "objectives iou, params, latency_ms" in report and "latency (ms)" in report
    # The exported architecture records every measured objective of its trial.
    exported = run_cli("nas.export", "results/tiny", "--format", "none", "--out", "model",
                       cwd=tmp_path)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    source = read_card(tmp_path / "model").source
    assert source["objectives"] == ["iou", "params", "latency_ms"]
    chosen = TrialRecord.of(study.trials[source["trial"]])
    assert source["measured"]["latency_ms"] == chosen.quantity("latency_ms") > 0
    assert source["measured"]["params"] == chosen.n_params <= 3000

    # Resuming with other objectives is refused, naming both lists; nothing is touched.
    before = len(trials)
    space.write_text(tiny_space_yaml(tiny_dataset, n_trials=8, extra="  objectives: [iou, macs]\n"))
    again = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "['iou', 'params', 'latency_ms']" in again.stderr and "['iou', 'macs']" in again.stderr
    assert len(study.get_trials()) == before


def test_a_study_written_by_the_first_release_still_reports_exports_and_retrains(
    tmp_path, tiny_dataset
):
    results = tmp_path / "results" / "v1"
    shutil.copytree(FIXTURE, results)
    storage = f"sqlite:///{results / 'study.db'}"
    study = optuna.load_study(study_name="v1", storage=storage)
    assert study_objectives(study).names == ["iou", "params"]  # no attr: the default
    # The data moved since (as a user's may): point the study at where it is now.
    data = dict(StudyRecord.of(study).data_config, path=str(tiny_dataset))
    write_study(study, data_config=data)

    report = run_cli("nas.report", "results/v1", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    exported = run_cli("nas.export", "results/v1", "--format", "none", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "trial 6" in exported.stdout  # the front's best IoU (trials 5 and 6 are on it)
    retrained = run_cli("nas.retrain", "results/v1", "--trials", "5", "--epochs", "2",
                        cwd=tmp_path)  # fmt: skip
    assert retrained.returncode == 0, retrained.stderr
    table = pd.read_csv(results / "retrained.csv")
    assert table["trial"].tolist() == [5] and table["retrained_val_iou"].notna().all()
