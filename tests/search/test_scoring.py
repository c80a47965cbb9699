"""The search's one score and front, its validation patches, intervals and choice: validation
costs a bounded, known amount; every view reads one score; export --best applies the
one-standard-error rule and says so."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from nas.core.errors import NasError
from nas.data.labels import LabelScheme
from nas.search.choice import choose_trial
from nas.search.record import TrialRecord, write_study
from nas.search.sampler import MIN_AT_RUNG, at_common_rung, common_rung
from nas.search.scoring import (
    decision_epochs,
    difference_error,
    front_of,
    interval,
    joins_front,
    one_standard_error_choice,
    rank_correlation,
    search_score,
)
from nas.validation.validate import ValidationPatches, evaluate_patches
from tests.conftest import run_cli, tiny_space_yaml, user_error

ONE_CLASS = LabelScheme.build({0: 0, 1: 1}, ("lesion",))


def _counts(ious, truth=100.0):
    """Per-case counts (case, 3, 1) whose IoU per case is each of `ious` (predicted = truth)."""
    cases = []
    for iou in ious:
        intersection = 2 * truth * iou / (1 + iou)  # I / (P + T - I) = iou with P = T
        cases.append([[intersection], [truth], [truth]])
    return cases


def _member(number, iou, params, case_ious=None, curve=None, rungs=(3, 9)):
    attrs = {"val_iou": iou, "n_params": params, "rungs": list(rungs), "epochs_run": 9}
    if case_ious is not None:  # the last two validations, as a search trial keeps them
        attrs["val_case_counts"] = {"8": _counts(case_ious), "9": _counts(case_ious)}
    trial = create_trial(
        values=[iou, params],
        params={"lr": 0.01},
        distributions={"lr": FloatDistribution(0.001, 0.1)},
        user_attrs=attrs,
        intermediate_values=curve or {8: iou, 9: iou},
    )
    trial.number = number
    return trial


def test_the_search_score_is_the_mean_of_the_last_validations_at_the_fidelity_reached():
    curve = {2: 0.2, 3: 0.4, 9: 0.5, 10: 0.7}
    assert search_score(curve, 10) == pytest.approx(0.6)
    assert search_score(curve, 3) == pytest.approx(0.3)
    # An epoch the curve does not hold reads the last validated one before it.
    assert search_score(curve, 8) == pytest.approx(0.3)


def test_decisions_validate_only_the_window_before_a_segment_ends():
    assert decision_epochs(0, 3, None) == {2, 3}
    assert decision_epochs(3, 10, None) == {9, 10}
    assert decision_epochs(10, 11, None) == {11}  # a one-epoch segment: its own end only
    assert decision_epochs(0, 10, 4) == {4, 8, 9, 10}
    assert decision_epochs(5, 10, 4) == {8, 9, 10}


def test_an_interval_narrows_with_more_cases_and_is_zero_for_one(tmp_path):
    few = _member(0, 0.5, 100, case_ious=[0.3, 0.7, 0.5])
    many = _member(1, 0.5, 100, case_ious=[0.3, 0.7, 0.5] * 8)
    alone = _member(2, 0.5, 100, case_ious=[0.5])
    assert interval(few).se > interval(many).se > 0
    assert interval(alone).se == 0
    assert interval(few).low < 0.5 < interval(few).high
    # Deterministic: the same resamples every time the front is written.
    assert interval(few).se == interval(few).se
    # A trial that kept no counts (an older study) has no interval.
    assert interval(_member(3, 0.5, 100)) is None


def test_the_one_standard_error_rule_takes_the_smallest_member_within_the_best_error():
    members = [(0, 0.80, 0.03, 50_000), (1, 0.78, 0.02, 5_000), (2, 0.70, 0.05, 500)]
    assert one_standard_error_choice(members) == (0, 1)
    # Without any error, the best: the rule cannot invent a tie.
    exact = [(n, score, 0.0, params) for n, score, _, params in members]
    assert one_standard_error_choice(exact) == (0, 0)


def test_the_rule_pairs_the_cases_a_hard_case_shared_is_no_tie():
    """Seed 2 of search_vs_hand: a hard validation case makes each member's own error large,
    but the small member is worse on every case, so it is not within the best's error."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trial(_member(0, 0.80, 50_000, case_ious=[0.95, 0.55, 0.9, 0.9]))
    study.add_trial(_member(1, 0.75, 5_000, case_ious=[0.9, 0.5, 0.85, 0.85]))
    best, small = (interval(t) for t in study.trials)
    assert small.score + small.se >= best.score  # unpaired, it would reach the best
    assert difference_error(best, small) < 0.01  # paired, the gap of 0.05 is no noise
    assert choose_trial(study, None, None).number == 0
    # Without resamples to pair (an older study), the member's own error stands in.
    assert difference_error(None, small) == small.se


def test_export_best_applies_the_rule_and_best_score_keeps_the_maximum(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    # The large member scores 0.80, the small one 0.78; case by case they disagree (one
    # better here, the other there), so the gap is within the error of their difference.
    study.add_trial(_member(0, 0.80, 50_000, case_ious=[0.95, 0.65, 0.8, 0.8]))
    study.add_trial(_member(1, 0.78, 5_000, case_ious=[0.85, 0.72, 0.8, 0.75]))
    study.add_trial(_member(2, 0.40, 500, case_ious=[0.4, 0.4, 0.4, 0.4]))
    assert [t.number for t in front_of(study.trials)] == [2, 1, 0]
    assert choose_trial(study, None, None).number == 1
    assert choose_trial(study, None, None, best_score=True).number == 0
    with pytest.raises(NasError, match="--best-score"):
        choose_trial(study, None, None, by="cv", best_score=True)


def test_a_continuation_below_its_parent_joins_the_front_its_parent_leaves():
    parent = _member(0, 0.8, 1_000)
    running = create_trial(
        state=TrialState.RUNNING,
        params={"lr": 0.01},
        distributions={"lr": FloatDistribution(0.001, 0.1)},
        user_attrs={"continues": 0, "lineage": 0},
    )
    running.number = 1
    # Trained on, it ends at 0.75: it supersedes its parent, so it is on the front.
    assert joins_front([parent, running], 1, [0.75, 1_000], ["iou", "params"])


def test_validation_patches_are_fixed_bounded_and_centred_half_on_foreground(tiny_cases):
    patches = ValidationPatches(tiny_cases[:2], per_case=6, seed=0, slice_axis=2)
    again = ValidationPatches(tiny_cases[:2], per_case=6, seed=0, slice_axis=2)
    assert len(patches) == 12
    assert all(np.array_equal(a, b) for a, b in zip(patches.centres, again.centres, strict=True))
    for case, centres in zip(patches.cases, patches.centres, strict=True):
        on_foreground = [np.asarray(case.label)[tuple(c)] > 0 for c in centres]
        assert sum(on_foreground) >= 3
    images, labels, owners = patches.cut((16, 16))
    assert images.shape == (12, tiny_cases[0].image.shape[0], 16, 16)
    assert labels.shape == (12, 16, 16) and list(owners) == [0] * 6 + [1] * 6
    images3d, _, _ = patches.cut((16, 16, 8))
    assert images3d.shape[2:] == (16, 16, 8)


def test_what_validation_costs_is_set_by_the_patch_count_not_the_volume(tiny_cases):
    calls = []

    def model(batch):
        calls.append(batch.shape[0])
        return torch.zeros(batch.shape[0], 1, *batch.shape[2:])

    model.training, model.eval, model.train = False, lambda: None, lambda mode=True: None
    for cases in (tiny_cases[:1], tiny_cases[:3]):
        calls.clear()
        patches = ValidationPatches(cases, per_case=8, seed=0)
        scores = evaluate_patches(model, patches, ONE_CLASS, (16, 16), torch.device("cpu"))
        assert sum(calls) == 8 * len(cases)  # one forward pass per patch, whatever the volume
        assert len(scores.case_counts) == len(cases)
        assert scores.iou == 0.0  # nothing predicted where the patches hold foreground


def test_the_sampler_sees_every_candidate_at_one_common_rung():
    trials = [
        _member(n, 0.5 + n / 100, 1_000 + n, curve={2: 0.2 + n / 100, 3: 0.3 + n / 100})
        for n in range(MIN_AT_RUNG + 1)
    ]
    promoted = _member(9, 0.9, 5_000, curve={2: 0.1, 3: 0.1, 8: 0.9, 9: 0.9})
    seen = at_common_rung([*trials, promoted], score_index=0)
    assert common_rung([*trials, promoted]) == 3
    by_number = {t.number: t for t in seen}
    # The promoted candidate is seen at the rung everyone reached, not at its 0.9.
    assert by_number[9].values[0] == pytest.approx(0.1)
    assert by_number[0].values[0] == pytest.approx(0.25)
    # Once enough candidates reach the top rung, it is the common one, and the others are
    # shown as pruned below it.
    many = [_member(20 + n, 0.8, 2_000, curve={3: 0.3, 8: 0.8, 9: 0.8}) for n in range(5)]
    seen = at_common_rung([*trials, *many], score_index=0)
    assert common_rung([*trials, *many]) == 9
    assert {t.number for t in seen if t.state == TrialState.PRUNED} == {t.number for t in trials}
    assert all(t.state == TrialState.COMPLETE for t in trials)  # the study's own are untouched


def test_rank_correlation_of_consecutive_rungs():
    assert rank_correlation([(0.1, 0.2), (0.2, 0.4), (0.3, 0.5)]) == pytest.approx(1.0)
    assert rank_correlation([(0.1, 0.5), (0.2, 0.4), (0.3, 0.2)]) == pytest.approx(-1.0)
    assert rank_correlation([(0.1, 0.5), (0.2, 0.4)]) is None  # too few
    assert rank_correlation([(0.1, 0.5), (0.1, 0.4), (0.1, 0.2)]) is None  # one side constant


def test_a_study_records_how_it_validated(tmp_path):
    study = optuna.create_study(directions=["maximize", "minimize"])
    write_study(study, validation={"bootstrap": 10})
    study.add_trial(_member(0, 0.8, 1_000, case_ious=[0.9, 0.7]))
    record = TrialRecord.of(study.trials[0])
    assert sorted(record.val_case_counts) == ["8", "9"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("study.validation.every=0", "study.validation.every"),
        ("study.validation.every=99", "more than the 2 epochs"),
        ("study.validation.bootstrap=0", "study.validation.bootstrap"),
        ("study.validation.patches_per_case=0", "study.validation.patches_per_case"),
    ],
)
def test_a_bad_validation_setting_is_one_line_and_nothing_is_written(
    tmp_path, tiny_dataset, setting, message
):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    result = run_cli("nas.run", "space.yaml", "--set", setting, cwd=tmp_path)
    assert message in user_error(result)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.db"))
