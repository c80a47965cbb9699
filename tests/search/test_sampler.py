"""The sampler learns from one observation per candidate, at the fidelity it reached."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from nas.search.sampler import LineageSampler, _LatestView, latest_observations

LR = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}


def _trial(lr, value, state=TrialState.COMPLETE, **attrs):
    return create_trial(
        state=state,
        values=[value, 1000.0] if state == TrialState.COMPLETE else None,
        params={"lr": lr},
        distributions=LR,
        user_attrs=attrs,
    )


def test_a_continued_candidate_is_seen_once_at_its_latest_fidelity(tmp_path):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", directions=["maximize", "minimize"]
    )
    study.add_trials(
        [
            _trial(0.01, 0.5, lineage=0),  # 0: rung 3
            _trial(0.01, 0.8, continues=0, lineage=0),  # 1: the same network at rung 10
            _trial(0.02, 0.4, lineage=2),  # 2: another candidate
            _trial(0.01, 0.8, TrialState.RUNNING, continues=1, lineage=0),  # 3: on to 30
        ]
    )
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in latest_observations(trials)] == [1, 2]
    view = _LatestView(study)
    complete = view._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert [(t.number, t.values[0]) for t in complete] == [(1, 0.8), (2, 0.4)]
    assert view.directions == study.directions  # the rest is the study's own


def test_tpe_behind_the_lineage_view_samples_and_sees_no_repeats(tmp_path):
    seen: list[int] = []
    inner = optuna.samplers.TPESampler(seed=0, n_startup_trials=2)
    original = inner.sample_independent

    def spy(study, trial, name, distribution):
        seen.append(len(study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
        return original(study, trial, name, distribution)

    inner.sample_independent = spy
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        directions=["maximize", "minimize"],
        sampler=LineageSampler(inner),
    )
    study.add_trials([_trial(0.01, 0.5, lineage=0), _trial(0.01, 0.8, continues=0, lineage=0)])
    study.add_trials([_trial(0.03, 0.6, lineage=2)])
    study.optimize(lambda t: [t.suggest_float("lr", 1e-4, 1e-1, log=True), 1000.0], n_trials=2)
    # Three trials completed before the first new one, of which two are one candidate.
    assert seen == [2, 3]
    assert all(1e-4 <= t.params["lr"] <= 1e-1 for t in study.trials)


def test_tpe_learns_from_pruned_trials_of_a_multi_objective_study(tmp_path):
    # Optuna's TPE ranks pruned trials by their last intermediate value through
    # `study.direction`, which a multi-objective study refuses: the run died with a
    # RuntimeError once pruned trials had to fill TPE's "below" group (a tiny search with
    # asha and the pruner found it). Their curves are validation IoU: higher is better.
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        directions=["maximize", "minimize"],
        sampler=LineageSampler(optuna.samplers.TPESampler(n_startup_trials=2, seed=0)),
    )
    for lr, iou in [(0.001, 0.3), (0.01, 0.6), (0.05, 0.1), (0.002, 0.5)]:
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED, params={"lr": lr}, distributions=LR,
                intermediate_values={1: iou / 2, 2: iou},
            )
        )  # fmt: skip
    study.add_trial(_trial(0.02, 0.7))
    trial = study.ask(LR)
    assert 1e-4 <= trial.params["lr"] <= 1e-1
    assert _LatestView(study).direction == optuna.study.StudyDirection.MAXIMIZE
