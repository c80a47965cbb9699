"""Multi-fidelity: rungs, ranking by non-dominated sorting, promotions, the budget split; and
a tiny search whose candidates are promoted and continue from their own state."""

from __future__ import annotations

import time

import optuna
import pandas as pd
import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from nas.data import Slicing
from nas.data.labels import LabelScheme
from nas.network.unet_config import UNetConfig
from nas.search.candidate import Candidate
from nas.search.candidate_state import TrainingData, train_candidate
from nas.search.record import TrialRecord
from nas.search.schedule.budget import Budget, exploration_share, new_candidate_share, spending
from nas.search.schedule.endgame import final_fill, parity_promotions, standings, undertrained
from nas.search.schedule.policy import EpochReport, Schedule, Verdict, enqueue_promotion
from nas.search.schedule.pruner import PrunerConfig
from nas.search.schedule.ranking import Member, promotions, rank, rung_members
from nas.search.schedule.rungs import FidelityConfig, rung_epochs, segment_ends
from nas.search.scoring import raised_first_cut
from nas.search.trial import within_timeout
from nas.search.weights import checkpoint_path, load_state, save_checkpoint, save_state, state_path
from nas.training.train_config import TrainConfig
from tests.conftest import run_cli, tiny_space_yaml

CPU = torch.device("cpu")


def test_rungs_are_anchored_at_the_top_and_grow_by_eta():
    assert rung_epochs(FidelityConfig(min_epochs=2, eta=3), 24) == (3, 8, 24)
    assert rung_epochs(FidelityConfig(min_epochs=1, eta=2), 8) == (1, 2, 4, 8)
    assert rung_epochs(FidelityConfig(min_epochs=2, eta=3), 2) == (2,)
    assert rung_epochs(FidelityConfig(type="none"), 24) == (24,)
    # A floor in optimiser steps: 100 steps of 10-batch epochs put the lowest rung at 10.
    assert rung_epochs(FidelityConfig(min_epochs=3, min_steps=100, eta=3), 30, 10) == (10, 30)
    assert rung_epochs(FidelityConfig(min_epochs=3, min_steps=100, eta=3), 30, 50) == (3, 10, 30)
    assert rung_epochs(FidelityConfig(min_epochs=3, min_steps=400, eta=3), 30, 10) == (30,)
    # Successive halving spends about as much on each rung: 3 rungs, eta 3 -> 3/7 on new ones.
    assert new_candidate_share((3, 8, 24), 3) == pytest.approx(3 / 7)
    # Half of a multi-fidelity budget is kept for training the best long; one fidelity: none.
    assert exploration_share((3, 8, 24), 3) == pytest.approx(3 / 14)
    assert exploration_share((24,), 3) == 1.0


def test_ranking_keeps_a_small_network_with_a_modest_iou_near_the_top():
    members = [
        Member(0, 0, 1_000_000, 0.80),
        Member(1, 1, 900_000, 0.70),  # dominated by 2
        Member(2, 2, 50_000, 0.75),
        Member(3, 3, 2_000, 0.40),  # the smallest: on the first front
        Member(4, 4, 800_000, 0.30),  # dominated
    ]
    ranked = [m.number for m in rank(members)]
    assert set(ranked[:3]) == {0, 2, 3}
    assert ranked.index(1) < ranked.index(4)


def test_ranking_counts_what_a_step_costs():
    # Equal size, a slightly better IoU at ten times the compute per step (a 3D network, or
    # 7x7 kernels): neither dominates, where on (IoU, params) alone the cheap one would rank
    # behind every network of its size with a better IoU.
    dear = Member(0, 0, 50_000, 0.62, step_macs=1e10)
    cheap = Member(1, 1, 50_000, 0.60, step_macs=1e9)
    middling = Member(2, 2, 50_000, 0.61, step_macs=1e10)  # dominated by `dear` alone
    assert [m.number for m in rank([dear, middling, cheap])] == [0, 1, 2]
    free = [Member(m.number, m.lineage, m.n_params, m.iou) for m in (dear, middling, cheap)]
    assert [m.number for m in rank(free)] == [0, 2, 1]
    # Where the study measures latency, a slower network of the same size and compute must
    # beat a faster one on IoU to rank ahead of it.
    fast = Member(5, 5, 50_000, 0.60, step_macs=1e9, costs=(2.0,))
    slow = Member(6, 6, 50_000, 0.61, step_macs=1e9, costs=(9.0,))
    slower = Member(7, 7, 50_000, 0.60, step_macs=1e9, costs=(12.0,))  # dominated by fast
    assert [m.number for m in rank([slower, slow, fast])][2] == 7
    # Unrecorded costs (0: a study from before) leave the ranking to IoU and size.
    assert [m.number for m in rank([Member(3, 3, 10, 0.5), Member(4, 4, 10, 0.4)])] == [3, 4]


def _trial(number, params, iou_by_epoch, epochs_run, state=TrialState.COMPLETE, **attrs):
    curve = dict(iou_by_epoch)
    values = [curve[max(curve)], params] if state == TrialState.COMPLETE else None
    scores = {"val_iou": values[0]} if values else {}  # as a search trial records its score
    trial = create_trial(
        state=state,
        values=values,
        params={"lr": 0.01},
        distributions={"lr": FloatDistribution(0.001, 0.1)},
        user_attrs={"n_params": params, "epochs_run": epochs_run, "lineage": number, **scores,
                    "train_config": {"batches_per_epoch": 10}, **attrs},
        intermediate_values=curve,
    )  # fmt: skip
    trial.number = number
    return trial


def test_the_top_third_of_a_rung_is_promoted_once():
    rungs = (2, 6, 18)
    trials = [_trial(n, 1000 * (n + 1), {2: 0.1 * n}, 2) for n in range(6)]
    # Same parameters at increasing size would all be on one front: make sizes equal.
    trials = [_trial(n, 1000, {2: 0.1 * n}, 2) for n in range(6)]
    due = promotions(trials, rungs, eta=3, endgame=False)
    assert [(p.number, p.rung, p.to_epoch) for p in due] == [(5, 2, 6), (4, 2, 6)]
    # Once trial 7 continues 5, only 4 is due; once 4 is also continued, none.
    running = _trial(7, 1000, {2: 0.5, 3: 0.6}, 3, TrialState.RUNNING, continues=5, lineage=5)
    assert [p.number for p in promotions([*trials, running], rungs, 3, False)] == [4]
    fewer = trials[:2]  # fewer than eta at the rung: nothing due unless in the endgame
    assert promotions(fewer, rungs, 3, endgame=False) == []
    assert [p.number for p in promotions(fewer, rungs, 3, endgame=True)] == [1]
    # With no budget, the endgame promotes a rung's best only until one went higher.
    went = _trial(8, 1000, {2: 0.1, 6: 0.2}, 6, continues=0, lineage=0)
    two = (2, 6)
    assert promotions([*fewer, went], two, 3, endgame=True, budgeted=False) == []

    # Rungs rank the mean of the last two validations, not one epoch's swing.
    swung = _trial(10, 1000, {1: 0.6, 2: 0.2}, 2)
    steady = _trial(11, 1000, {1: 0.35, 2: 0.35}, 2)
    scores = {m.number: m.iou for m in rung_members([swung, steady], 2)}
    assert scores == {10: pytest.approx(0.4), 11: pytest.approx(0.35)}


def test_the_budget_keeps_a_share_for_promotions_and_refuses_what_does_not_fit():
    trials = [_trial(n, 1000, {2: 0.5}, 2, steps=20, segment_seconds=2.0) for n in range(3)]
    spent = spending(trials)
    assert (spent.steps, spent.new_steps, spent.seconds_per_step) == (60, 60, 0.1)
    rungs = (2, 6, 18)
    assert Budget(steps=1000, seconds_left=None).allows_new(spent, rungs, 3)
    assert not Budget(steps=100, seconds_left=None).allows_new(spent, rungs, 3)
    # With only a deadline, new candidates' share is of the time: 6 s spent of 6 + 20 is
    # more than 3/14 of it, though 60 steps of the 260 the time allows are not.
    assert not Budget(None, seconds_left=20.0).allows_new(spent, rungs, 3)
    assert Budget(None, seconds_left=30.0).allows_new(spent, rungs, 3)
    slow_new = spending([*trials, _trial(3, 1000, {2: 0.5}, 2, steps=20, segment_seconds=8.0)])
    assert (slow_new.new_steps, slow_new.new_seconds) == (80, 14.0)
    assert not Budget(None, seconds_left=30.0).allows_new(slow_new, rungs, 3)
    # With only a deadline, the budget is what the time left allows at the measured speed.
    assert Budget(None, seconds_left=100.0).total_steps(spent) == pytest.approx(60 + 1000)
    assert Budget(None, seconds_left=10.0).affords(spent, 40, 0.2) is True
    assert Budget(None, seconds_left=10.0).affords(spent, 60, 0.2) is False
    assert Budget(100, None).affords(spent, 50, None) is False
    # A promotion while exploring may take at most a share (1/eta) of what is left.
    assert Budget(None, seconds_left=30.0).affords(spent, 40, 0.2, share=1 / 3) is True
    assert Budget(None, seconds_left=30.0).affords(spent, 60, 0.2, share=1 / 3) is False
    assert Budget(400, None).affords(spent, 120, None, share=1 / 3) is False  # 340 left
    # Successive halving gets half the budget: once it is spent, or a promotion would pass it,
    # the endgame begins and keeps the other half for the front.
    assert not Budget(steps=110, seconds_left=None).allows_new(spent, rungs, 3)  # 60 of 110
    assert Budget(steps=400, seconds_left=None).affords_while_exploring(spent, 100, None, 3)
    assert not Budget(400, None).affords_while_exploring(spent, 150, None, 3)  # 60 + 150 > 200
    assert Budget(None, 12.0).affords_while_exploring(spent, 30, 0.1, 3)  # 6 + 3 of 18 s
    assert not Budget(None, 12.0).affords_while_exploring(spent, 40, 0.1, 3)  # 6 + 4 > 9 s
    # What a final extension may use: the steps left, the time left less a margin.
    assert Budget(400, None).steps_left(spent, None) == 340
    assert Budget(None, 100.0).steps_left(spent, 0.5) == pytest.approx(190)


def test_new_candidates_count_to_their_lowest_rung():
    rungs = (2, 6, 18)
    # A new candidate promoted within its trial to rung 6, and stopped there; two at rung 2.
    climbed = _trial(0, 9_000, {2: 0.6, 6: 0.7}, 6, steps=60, rungs=list(rungs))
    waiting = [_trial(n, 1_000 * n, {2: 0.1 * n}, 2, steps=20, rungs=list(rungs)) for n in (1, 2)]
    # The share of new candidates counts what successive halving spends on the lowest rung:
    # the 40 steps trial 0 trained beyond rung 2 are a promotion's.
    assert spending([climbed, *waiting]).new_steps == 20 + 20 + 20


def test_the_endgame_lifts_the_front_least_trained_first():
    rungs = (2, 6)
    made = {"rungs": list(rungs)}
    # A large network stopped at rung 2 with 0.5; a small one trained to 18 epochs has 0.8
    # now but had only 0.3 at epoch 2: at equal fidelity it does not beat the large one.
    large = _trial(0, 500_000, {1: 0.4, 2: 0.5}, 2, **made)
    small = _trial(1, 2_000, {1: 0.2, 2: 0.3, 6: 0.6, 18: 0.8, 17: 0.79}, 18, **made)
    # Beaten at equal fidelity by the small one (fewer parameters, better at epoch 2): out.
    beaten = _trial(2, 3_000, {1: 0.1, 2: 0.2}, 2, **made)
    due = parity_promotions(standings([large, small, beaten], rungs, 3), rungs, 3)
    assert [(p.number, p.rung, p.to_epoch) for p in due] == [(0, 2, 6), (1, 18, 54)]
    # A stub beats no one trained longer: 1,000 parameters at 0.35 after 2 epochs does not
    # push out the small network trained to 18 (0.3 at epoch 2); it is on the front too.
    stub = _trial(3, 1_000, {1: 0.35, 2: 0.35}, 2, **made)
    due = parity_promotions(standings([large, small, stub], rungs, 3), rungs, 3)
    assert [p.number for p in due] == [0, 3, 1]  # equal steps: the better first
    # A converged one (+0.003 over its last level) climbs no more.
    converged = _trial(1, 2_000, {2: 0.3, 6: 0.797, 5: 0.797, 18: 0.8, 17: 0.8}, 18, **made)
    assert [
        p.number for p in parity_promotions(standings([large, converged], rungs, 3), rungs, 3)
    ] == [0]


def test_the_last_of_the_budget_goes_to_the_best_without_leaving_a_neighbour_far_behind():
    rungs = (2, 6)
    made = {"rungs": list(rungs)}
    best = _trial(0, 50_000, {5: 0.7, 6: 0.7}, 6, **made)
    small = _trial(1, 20_000, {5: 0.4, 6: 0.4}, 6, **made)
    tiny = _trial(2, 100, {5: 0.3, 6: 0.3}, 6, **made)  # 500 times smaller: not a neighbour
    trials = [best, small, tiny]
    # The best could use 100 more epochs; its neighbour has 6, so it stops at 4 x 6 = 24.
    fill = final_fill(standings(trials, rungs, 3), lambda trial: 100)
    assert (fill.number, fill.rung, fill.to_epoch, fill.extends) == (0, 6, 24, True)
    # Without the neighbour, all that is left; less than half again is not worth a restart.
    assert final_fill(standings([best, tiny], rungs, 3), lambda trial: 100).to_epoch == 106
    assert final_fill(standings([best], rungs, 3), lambda trial: 2) is None


def test_members_trained_far_less_than_their_neighbours_are_marked():
    # (parameters, steps): 3,000 trained 100 steps beside 20,000 trained 1,000 is a stub;
    # 1,000,000 is more than ten times larger than any other, compared with itself only.
    front = [(3_000, 100), (20_000, 1_000), (90_000, 400), (1_000_000, 10)]
    assert undertrained(front) == [True, False, False, False]


def test_the_endgame_shares_the_budget_across_the_front():
    rungs = (2, 6)
    made = {"steps": 60, "segment_seconds": 6.0, "rungs": list(rungs)}
    best = _trial(0, 50_000, {2: 0.5, 5: 0.7, 6: 0.7}, 6, **made)  # eta times longer: 120 steps
    small = _trial(1, 1_000, {1: 0.3, 2: 0.4}, 2, **{**made, "steps": 20})
    # Room for both: the least trained (small, to rung 6) comes first, then the best.
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials([best, small])
    schedule = Schedule(rungs, 3, n_trials=2, budget_steps=80 + 1000)
    promotion = enqueue_promotion(study, schedule)
    assert (promotion.number, promotion.to_epoch) == (1, 6)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(TrialRecord.of(t).continues, TrialRecord.of(t).until) for t in waiting] == [(1, 6)]
    # With 30 steps left, no level fits (the small one's takes 40), and the best fills what
    # is left: 3 epochs, half again of its 6.
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials([best, small])
    promotion = enqueue_promotion(study, Schedule(rungs, 3, 2, 80 + 30))
    assert (promotion.number, promotion.to_epoch) == (0, 9)


def test_a_continued_segment_starts_from_the_saved_state(tmp_path, tiny_cases):
    unet = UNetConfig(spatial_dims=2, depth=2, base_channels=4)
    train = TrainConfig(epochs=4, batches_per_epoch=2, batch_size_2d=2, patch_size_2d=(32, 32))
    data = TrainingData(tiny_cases[:4], tiny_cases[4:], LabelScheme(("lesion",), (0, 1)), Slicing())
    first = train_candidate(Candidate(unet, train), data, CPU, until_epoch=2)
    assert [e.epoch for e in first.fit.history] == [1, 2] and first.state.epoch == 2
    weights = save_checkpoint(tmp_path, 0, first.state.weights)
    save_state(weights, first.state)
    state = load_state(weights, CPU)
    assert state.epoch == 2
    assert state.optimizer["state"]  # Adam's moments, not a fresh optimizer
    second = train_candidate(Candidate(unet, train), data, CPU, until_epoch=4, state=state)
    assert [e.epoch for e in second.fit.history] == [3, 4]
    assert second.fit.steps == 4
    # Stopping is the caller's decision: answering False ends the segment there.
    stopped = train_candidate(Candidate(unet, train), data, CPU, 4, state, lambda r: False)
    assert [e.epoch for e in stopped.fit.history] == [3]


@pytest.mark.slow
def test_a_search_promotes_candidates_that_continue_their_own_training(tmp_path, tiny_dataset):
    space = tiny_space_yaml(tiny_dataset, n_trials=4, extra="  fidelity: {min_epochs: 1, eta: 3}\n")
    space = space.replace("\n  epochs: 2", "\n  epochs: 3")
    space = space.replace("batches_per_epoch: 3", "batches_per_epoch: 2")
    (tmp_path / "space.yaml").write_text(space)
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rungs at epochs 1, 3" in result.stdout
    study = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{tmp_path / 'results/tiny/study.db'}"
    )
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    new = [t for t in trials if TrialRecord.of(t).continues is None]
    assert len(new) == 4
    top = [t for t in trials if TrialRecord.of(t).epochs_run == 3]
    assert top, "no candidate reached the top rung"
    assert all(TrialRecord.of(t).epochs_run in (1, 3) for t in trials)
    by_number = {t.number: t for t in study.trials}
    for trial in trials:
        if TrialRecord.of(trial).continues is not None:  # from its parent's state, not retrained
            parent = by_number[TrialRecord.of(trial).continues]
            assert trial.params == parent.params
            assert TrialRecord.of(trial).unet_config == TrialRecord.of(parent).unet_config
            assert sorted(trial.intermediate_values) == [1, 2, 3]
            assert trial.intermediate_values[1] == parent.intermediate_values[1]
            assert TrialRecord.of(trial).steps == 2 * 2  # epochs 2 and 3 only
    results = tmp_path / "results" / "tiny"
    front = pd.read_csv(results / "pareto.csv")
    continued = {
        TrialRecord.of(t).continues for t in trials if TrialRecord.of(t).continues is not None
    }
    assert not continued & set(front.number)  # each candidate at the fidelity it reached
    # Each member's steps, and whether it trained far less than a member of similar size.
    for row in front.itertuples():
        similar = front[front.n_params.between(row.n_params / 10, row.n_params * 10)]
        assert row.undertrained == (row.fidelity_steps < 0.25 * similar.fidelity_steps.max())
    for number in continued:  # superseded: neither weights nor state are kept
        assert not checkpoint_path(results, number).exists()
        assert not state_path(checkpoint_path(results, number)).exists()
    for trial in top:  # a budget could still train these longer: their state is kept
        if trial.number not in continued:
            assert state_path(checkpoint_path(results, trial.number)).exists()


def test_a_budget_smaller_than_one_rung_is_refused(tmp_path, tiny_dataset):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset))
    result = run_cli("nas.run", "space.yaml", "--budget", "5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--budget: a budget of 5 optimiser steps is less than one candidate's lowest rung" in (
        result.stderr
    )
    assert not (tmp_path / "results" / "tiny" / "study.db").exists()


def test_an_interrupted_continuation_is_rerun_as_a_continuation(tmp_path):
    from nas.search.space import StudySection
    from nas.search.study import INTERRUPTED, open_study

    cfg = StudySection(name="s", sampler="random")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(cfg, storage)
    parent = _trial(0, 1000, {1: 0.5}, 1)
    study.add_trial(parent)
    interrupted = create_trial(
        state=TrialState.FAIL,
        params={"lr": 0.01},
        distributions={"lr": FloatDistribution(0.001, 0.1)},
        user_attrs={"continues": 0, "lineage": 0, "fail_reason": INTERRUPTED},
    )
    study.add_trial(interrupted)
    again = open_study(cfg, storage)  # the next run
    waiting = again.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].user_attrs == {"retry_of": 1, "continues": 0, "lineage": 0}


def test_training_ends_a_segment_at_every_rung_it_passes():
    assert segment_ends(0, 30, (3, 10, 30)) == [3, 10, 30]
    assert segment_ends(3, 30, (3, 10, 30)) == [10, 30]
    assert segment_ends(30, 90, (3, 10, 30)) == [90]  # beyond the top: one segment


def test_a_segment_is_capped_at_the_time_left_to_the_run():
    """A run with a timeout ends when it said: each segment may take at most the time left,
    and a later segment does not start once the time is up."""
    candidate = Candidate(UNetConfig(spatial_dims=2, depth=2), TrainConfig(epochs=30))
    rungs = (3, 10, 30)
    assert within_timeout(candidate, Schedule(rungs, 3, 10, 1000), first=False) is candidate
    ahead = Schedule(rungs, 3, 10, deadline=time.monotonic() + 100)
    capped = within_timeout(candidate, ahead, first=False)
    assert 90 < capped.train.max_seconds <= 100
    assert (capped.unet, capped.train.epochs) == (candidate.unet, candidate.train.epochs)
    own_cap = Candidate(candidate.unet, TrainConfig(epochs=30, max_seconds=20))
    assert within_timeout(own_cap, ahead, first=True).train.max_seconds == 20
    past = Schedule(rungs, 3, 10, deadline=time.monotonic() - 1)
    assert within_timeout(candidate, past, first=False) is None
    assert within_timeout(candidate, past, first=True) is candidate  # begun as time ran out


def test_the_schedule_decides_after_each_epoch_at_rungs_and_with_the_pruner():
    rungs = (2, 6, 18)
    peers = [_trial(n, 1000, {1: 0.1 * n, 2: 0.1 * n}, 2) for n in range(6)]
    schedule = Schedule(rungs, 3, n_trials=10, budget_steps=100_000)

    def report(number, epoch, curve, costs=None):
        return EpochReport(number, number, epoch, curve, costs or {"params": 1000}, 10, 0.1,
                           rungs)  # fmt: skip

    # At rung 2 the top third of six (trials 5 and 4) go on; trial 1 stops, unpruned.
    assert schedule.after_epoch(peers, report(5, 2, {2: 0.5})) == Verdict(True)
    assert schedule.after_epoch(peers, report(1, 2, {2: 0.1})) == Verdict(False)
    # Between rungs the pruner decides: off by default, on when the space asks for it.
    later = [_trial(n, 1000, {1: 0.1, 2: 0.1, 3: 0.5 + 0.1 * n}, 3) for n in range(3)]
    behind = report(9, 3, {3: 0.2}, {"params": 5000})
    assert schedule.after_epoch(later, behind) == Verdict(True)
    pruning = Schedule(rungs, 3, 10, 100_000, pruner=PrunerConfig(warmup_epochs=1, k=2))
    verdict = pruning.after_epoch(later, behind)
    assert not verdict.go_on and "dominated by cheaper networks" in verdict.pruned


def test_a_weak_first_cut_is_raised_for_new_candidates():
    rungs = (2, 6, 18)
    schedule = Schedule(rungs, 3, n_trials=20, budget_steps=100_000)
    made = {"rungs": list(rungs)}

    def climbed(number, at_2, at_6):
        return _trial(number, 1000 + number, {1: at_2, 2: at_2, 5: at_6, 6: at_6}, 6, **made)

    # Six candidates whose rung-2 ranking foretells rung 6's exactly: the cut stays.
    agreeing = [climbed(n, 0.1 * n, 0.1 * n + 0.3) for n in range(6)]
    assert schedule.new_candidate_rungs(agreeing) == rungs
    # Reversed: the first cut ranks on noise, so new candidates train to rung 6 first.
    reversed_ = [climbed(n, 0.1 * n, 0.8 - 0.1 * n) for n in range(6)]
    assert schedule.new_candidate_rungs(reversed_) == (6, 18)
    # Too few candidates to tell: the cut stays.
    assert schedule.new_candidate_rungs(reversed_[:5]) == rungs
    # Once a new candidate started past it, it stays raised whatever comes next.
    raised = _trial(9, 500, {5: 0.5, 6: 0.5}, 6, rungs=[6, 18])
    assert schedule.new_candidate_rungs([*agreeing, raised]) == (6, 18)
    assert raised_first_cut([*agreeing, raised]) == (9, 6)  # what the run's summary says
    assert raised_first_cut(agreeing) is None
    # A raised candidate is not stopped at the rung it skipped.
    report = EpochReport(9, 9, 2, {2: 0.0}, {"params": 500}, 10, 0.1, (6, 18))
    assert schedule.after_epoch(reversed_, report) == Verdict(True)
