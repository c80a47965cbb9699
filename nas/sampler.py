"""What the sampler learns from: one observation per candidate, at the fidelity it reached.

A promoted candidate continues in a new trial with the same parameters, and its earlier
trial stays COMPLETE with the value it had at the lower rung (Optuna cannot change a finished
trial). A sampler reading every trial would count that configuration twice, once at a low and
once at a high fidelity. `LineageSampler` wraps Optuna's sampler and shows it the study
without those superseded trials, and without running continuations (their parameters are
fixed, not the sampler's to spread out), so each candidate is one observation at its latest
fidelity. Everything else is the wrapped sampler's own.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nas.fidelity import superseded_numbers
from nas.record import TrialRecord


def latest_observations(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """`trials` less those a later trial continued and completed, and less running
    continuations."""
    superseded = superseded_numbers(trials)
    return [
        t
        for t in trials
        if t.number not in superseded
        and not (t.state == TrialState.RUNNING and TrialRecord.of(t).continues is not None)
    ]


class _LatestView:
    """A study as the wrapped sampler sees it: its trials through `latest_observations`."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    @property
    def direction(self) -> StudyDirection:
        """Optuna's TPE ranks pruned trials by their last intermediate value through
        `study.direction`, which a multi-objective study refuses with a RuntimeError (Optuna
        5.1): here intermediate values are validation IoU, higher better."""
        if len(self._study.directions) > 1:
            return StudyDirection.MAXIMIZE
        return self._study.direction

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, use_cache=use_cache)
        seen = latest_observations(trials)
        return seen if states is None else [t for t in seen if t.state in states]

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)


class LineageSampler(BaseSampler):
    """`sampler`, learning from one observation per candidate (`latest_observations`)."""

    def __init__(self, sampler: BaseSampler) -> None:
        self.sampler = sampler

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(_LatestView(study), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.sampler.sample_relative(_LatestView(study), trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        view = _LatestView(study)
        return self.sampler.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(_LatestView(study), trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.sampler.after_trial(_LatestView(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
