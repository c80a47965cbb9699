"""`objectives: [case_dice, params]`: a search that selects on per-case Dice does so
throughout. Its learning curves, search score, bootstrap interval, pareto.csv, report and
export --best all read case Dice, computed from the per-case counts validation keeps; and an
unknown objective is one line naming the space file."""

from __future__ import annotations

from typing import get_args

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from nas.data.labels import LabelScheme
from nas.network.model_card import read_card
from nas.search.objectives import OBJECTIVES, Name, curve_metric
from nas.search.record import TrialRecord
from nas.search.scoring import interval
from nas.validation.metrics import case_dice_from_counts
from nas.validation.validate import PooledCounts
from tests.conftest import run_cli, tiny_space_yaml, user_error


def test_every_objective_can_be_named_in_a_space_and_only_case_dice_changes_the_curve():
    assert set(get_args(Name)) == set(OBJECTIVES)
    assert curve_metric(["iou", "params"]) == curve_metric(["dice", "params"]) == "iou"
    assert curve_metric(["params", "case_dice"]) == "case_dice"
    assert curve_metric(["iou", "case_dice", "params"]) == "iou"  # the first score ranks


def test_validation_scores_carry_case_dice_beside_pooled_dice():
    counts = PooledCounts(LabelScheme.build({0: 0, 1: 1}, ("lesion",)))
    large, small = np.zeros((20, 20, 20), np.uint8), np.zeros((20, 20, 20), np.uint8)
    large[:10] = 1  # 4,000 voxels, found
    small[0, 0, :2] = 1  # 2 voxels, missed
    counts.add(large, large)
    counts.add(np.zeros_like(small), small)
    counts.add(np.zeros_like(small), np.zeros_like(small))  # nothing to find: left out
    scores = counts.scores()
    assert scores.dice == pytest.approx(8000 / 8002)  # pooled: the large lesion rules
    assert scores.case_dice == pytest.approx(0.5)  # one case found, one missed
    assert scores.value("case_dice") == scores.case_dice and scores.value("iou") == scores.iou


def _trial(case_dice: float, counts: list) -> optuna.trial.FrozenTrial:
    trial = create_trial(
        values=[case_dice, 1000],
        params={"lr": 0.01},
        distributions={"lr": FloatDistribution(0.001, 0.1)},
        user_attrs={
            "val_case_dice": case_dice,
            "val_iou": 0.9,
            "n_params": 1000,
            "val_case_counts": {"8": counts, "9": counts},
        },  # fmt: skip
        intermediate_values={8: case_dice, 9: case_dice},
    )
    trial.number = 0
    return trial


def test_the_interval_of_case_dice_resamples_cases_and_scores_each_by_case():
    # Two cases found whole, two missed: case Dice 0.5; pooled IoU would be near 1.
    found, missed = [[100.0], [100.0], [100.0]], [[0.0], [0.0], [2.0]]
    counts = [found, found, missed, missed]
    trial = _trial(0.5, counts)
    scored = interval(trial, metric="case_dice")
    assert scored.score == 0.5  # the trial's recorded case Dice
    # Each resample is scored by case: a mean of 1s and 0s, so about 0.5 +- 0.25.
    assert scored.resampled.mean() == pytest.approx(0.5, abs=0.05)
    assert scored.se == pytest.approx(0.25, abs=0.05)
    by_iou = interval(trial)  # the default: pooled IoU over each resample's cases
    assert by_iou.score == 0.9 and np.median(by_iou.resampled) > 0.9


def test_unknown_objective_is_one_line_naming_the_space_file_and_the_known_ones(
    tmp_path, tiny_dataset
):
    space = tiny_space_yaml(tiny_dataset, extra="  objectives: [foo, params]\n")
    (tmp_path / "space.yaml").write_text(space)
    line = user_error(run_cli("nas.run", "space.yaml", cwd=tmp_path))
    known = ", ".join(OBJECTIVES)
    assert (
        line == f"error: space.yaml: study.objectives.0: unknown objective 'foo' (known: {known})"
    )
    assert "case_dice" in known
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_search_on_case_dice_ranks_scores_and_exports_by_case_dice(tmp_path, tiny_dataset):
    space = tiny_space_yaml(tiny_dataset, n_trials=3, extra="  objectives: [case_dice, params]\n")
    (tmp_path / "space.yaml").write_text(space)
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "results" / "tiny"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(completed) == 3
    for trial in completed:
        record = TrialRecord.of(trial)
        curve = trial.intermediate_values
        # The curve is case Dice, from the per-case counts each validation kept...
        for epoch, counts in record.val_case_counts.items():
            assert curve[int(epoch)] == pytest.approx(case_dice_from_counts(counts))
        # ... and the objective is its smoothed value, stored as the trial's case Dice.
        assert trial.values[0] == pytest.approx((curve[1] + curve[2]) / 2)
        assert trial.values[0] == record.quantity("case_dice")
        assert record.iou is not None and record.iou != trial.values[0]  # the last IoU

    pareto = pd.read_csv(out / "pareto.csv")
    by_number = {t.number: t for t in completed}
    for row in pareto.itertuples():
        assert row.val_case_dice == pytest.approx(by_number[row.number].values[0], abs=1e-12)
        assert row.val_case_dice_low <= row.val_case_dice <= row.val_case_dice_high
        assert 0 <= row.volume_val_case_dice <= 1 and 0 <= row.volume_val_iou <= 1
    assert "val_iou_se" not in pareto  # no interval of a score the search did not rank on
    assert pareto.val_case_dice_se.notna().all()
    report = (out / "report.html").read_text()
    assert "validation case Dice" in report and "val_case_dice_se" in report

    exported = run_cli("nas.export", "results/tiny", "--best", "--format", "none",
                       "--out", "model", cwd=tmp_path)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    source = read_card(tmp_path / "model").source
    best = max(completed, key=lambda t: (t.values[0], -t.values[1]))
    intervals = {row.number: row.val_case_dice_se for row in pareto.itertuples()}
    assert f"trial {best.number} ({best.values[0]:.4f} +- {intervals[best.number]:.4f})" in (
        exported.stdout
    )
    assert source["val_case_dice"] == by_number[source["trial"]].values[0]
    assert source["objectives"] == ["case_dice", "params"]
