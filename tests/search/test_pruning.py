"""The Pareto-aware pruner, on hand-made trial histories and in a real search."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from nas.search.record import TrialRecord, carried
from nas.search.schedule.pruner import PrunerConfig, dominated_at_epoch
from nas.search.scoring import search_score
from tests.conftest import run_cli, tiny_space_yaml

CFG = PrunerConfig(warmup_epochs=2, k=2, min_trials=3)


def _history(n_params: int, curve: list[float], state=TrialState.COMPLETE, **quantities):
    """A finished trial with a validation IoU per epoch (1-based), and other `quantities`."""
    values = [curve[-1], n_params] if state == TrialState.COMPLETE else None
    return create_trial(
        state=state,
        values=values,
        user_attrs=carried(params=n_params, **quantities),
        intermediate_values={epoch: iou for epoch, iou in enumerate(curve, start=1)},
    )


def _numbered(trials):
    for number, trial in enumerate(trials):
        trial.number = number
    return trials


PEERS = _numbered(
    [
        _history(1_000, [0.2, 0.4, 0.6, 0.7]),
        _history(5_000, [0.3, 0.5, 0.7, 0.8]),
        _history(50_000, [0.3, 0.6, 0.8, 0.85]),
        _history(200_000, [0.1, 0.2, 0.3, 0.4], TrialState.PRUNED),
    ]
)


def test_a_dominated_candidate_is_stopped():
    # 60k params, IoU 0.5 at epoch 3: three smaller trials were better then.
    assert dominated_at_epoch(CFG, PEERS, number=99, costs={"params": 60_000}, epoch=3, iou=0.5)


def test_a_small_candidate_with_a_modest_but_unmatched_iou_is_kept():
    # 800 params: nobody that small exists, so IoU 0.3 is a point of the front.
    assert not dominated_at_epoch(CFG, PEERS, number=99, costs={"params": 800}, epoch=3, iou=0.3)
    # 2k params: only one smaller trial (1k) beat it; k = 2 are needed.
    assert not dominated_at_epoch(CFG, PEERS, number=99, costs={"params": 2_000}, epoch=3, iou=0.5)


def test_warm_up_epochs_are_respected():
    assert not dominated_at_epoch(CFG, PEERS, number=99, costs={"params": 60_000}, epoch=2, iou=0.0)
    assert dominated_at_epoch(CFG, PEERS, number=99, costs={"params": 60_000}, epoch=3, iou=0.0)


def test_minimum_trials_are_respected():
    strict = PrunerConfig(warmup_epochs=0, k=1, min_trials=5)
    assert not dominated_at_epoch(
        strict, PEERS, number=99, costs={"params": 60_000}, epoch=3, iou=0.0
    )
    # A trial that never reached the epoch does not count towards the minimum.
    short = _numbered([_history(100, [0.9]) for _ in range(4)])
    lenient = PrunerConfig(warmup_epochs=0, k=1, min_trials=4)
    assert dominated_at_epoch(lenient, short, number=99, costs={"params": 1_000}, epoch=1, iou=0.1)
    assert not dominated_at_epoch(
        lenient, short, number=99, costs={"params": 1_000}, epoch=2, iou=0.1
    )


def test_a_trial_is_not_compared_with_itself_and_none_disables_pruning():
    itself = PEERS[2].number
    own = _numbered([*PEERS])
    assert not dominated_at_epoch(
        PrunerConfig(warmup_epochs=0, k=3, min_trials=1), own, itself, {"params": 50_000}, 3, 0.8
    )
    off = PrunerConfig(type="none")
    assert not dominated_at_epoch(off, PEERS, number=99, costs={"params": 10**9}, epoch=4, iou=0.0)


def test_with_more_costs_a_peer_must_cost_no_more_on_every_one():
    # Three objectives to minimise besides IoU: a peer with fewer parameters but a slower
    # forward pass does not count against a fast candidate.
    def timed(n_params, latency, curve):
        return _history(n_params, curve, latency_ms=latency)

    peers = _numbered([timed(1_000, 9.0, [0.6, 0.7]), timed(2_000, 8.0, [0.6, 0.7])])
    lenient = PrunerConfig(warmup_epochs=0, k=2, min_trials=2)
    fast = {"params": 5_000, "latency_ms": 2.0}
    assert not dominated_at_epoch(lenient, peers, 99, fast, epoch=2, iou=0.5)
    slow = {"params": 5_000, "latency_ms": 10.0}
    assert dominated_at_epoch(lenient, peers, 99, slow, epoch=2, iou=0.5)


def test_peers_are_compared_on_the_search_score():
    # Two smaller peers reached 0.7 at epoch 2 and 0.5 at epoch 3: their score at epoch 3 is
    # the mean of the last two validations, 0.6, so a larger candidate at 0.55 is dominated
    # and one at 0.6 is not (a tie stops no one).
    dipping = _numbered([_history(1_000, [0.2, 0.7, 0.5]), _history(2_000, [0.3, 0.7, 0.5])])
    lenient = PrunerConfig(warmup_epochs=1, k=2, min_trials=2)
    assert dominated_at_epoch(lenient, dipping, 99, costs={"params": 3_000}, epoch=3, iou=0.55)
    assert not dominated_at_epoch(lenient, dipping, 99, costs={"params": 3_000}, epoch=3, iou=0.6)
    # A later epoch does not leak into an earlier comparison.
    assert search_score({1: 0.2, 2: 0.7, 3: 0.1}, 1) == 0.2


def test_histories_from_a_single_direction_study_work_too(tmp_path):
    study = optuna.create_study(direction="maximize", storage=f"sqlite:///{tmp_path / 's.db'}")
    for n_params, curve in ((1_000, [0.5, 0.6, 0.7]), (2_000, [0.6, 0.7, 0.8])):
        study.add_trial(
            create_trial(
                value=curve[-1],
                user_attrs={"n_params": n_params},
                intermediate_values=dict(enumerate(curve, start=1)),
            )
        )
    lenient = PrunerConfig(warmup_epochs=1, k=2, min_trials=2)
    assert dominated_at_epoch(lenient, study.trials, 99, costs={"params": 3_000}, epoch=3, iou=0.5)
    assert not dominated_at_epoch(
        lenient, study.trials, 99, costs={"params": 1_500}, epoch=3, iou=0.5
    )


@pytest.mark.slow
def test_search_prunes_dominated_trials_and_keeps_their_curves(tmp_path, tiny_dataset):
    space = tiny_space_yaml(
        tiny_dataset, n_trials=8, pruner="{type: pareto, warmup_epochs: 1, k: 1, min_trials: 1}"
    ).replace("epochs: 2", "epochs: 4")
    (tmp_path / "space.yaml").write_text(space)
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{tmp_path / 'results/tiny/study.db'}"
    )
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "expected at least one pruned trial"
    for trial in pruned:
        assert 2 <= max(trial.intermediate_values) < 4  # stopped after warm-up, before the end
        curve = trial.intermediate_values
        assert TrialRecord.of(trial).iou == pytest.approx(search_score(curve, max(curve)))
        assert len(TrialRecord.of(trial).epoch_seconds) == max(trial.intermediate_values)
    table = pd.read_csv(tmp_path / "results" / "tiny" / "trials.csv")
    assert set(table[table.state == "PRUNED"].number) == {t.number for t in pruned}
    assert table[table.state == "PRUNED"].val_iou.notna().all()
    assert "PRUNED" in result.stdout


@pytest.mark.slow
def test_enqueued_architectures_run_first(tmp_path, tiny_dataset):
    space = tiny_space_yaml(tiny_dataset, n_trials=3) + (
        "  enqueue:\n"
        "    - {spatial_dims: 2, depth: 3, skips: [false, true], learning_rate: 0.005}\n"
        "    - {spatial_dims: 3, depth: 1, anisotropic_stages: 1}\n"
    )
    (tmp_path / "space.yaml").write_text(space)
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{tmp_path / 'results/tiny/study.db'}"
    ).trials
    first, second = (TrialRecord.of(t).unet_config for t in trials[:2])
    assert (first["spatial_dims"], first["depth"], first["skips"]) == (2, 3, [False, True])
    assert trials[0].params["learning_rate"] == 0.005
    assert (second["spatial_dims"], second["depth"], second["anisotropic_stages"]) == (3, 1, 1)
    assert TrialRecord.of(trials[0]).warm_start and "warm_start" not in trials[2].user_attrs


def test_an_enqueued_value_outside_the_space_is_refused(tmp_path, tiny_dataset):
    space = tiny_space_yaml(tiny_dataset) + "  enqueue:\n    - {depth: 9}\n"
    (tmp_path / "space.yaml").write_text(space)
    result = run_cli("nas.run", "space.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "study.enqueue[0]: depth: 9 is outside the search space of depth" in result.stderr
