"""What the sampler learns from: one observation per candidate, all at one fidelity.

A promoted candidate continues in a new trial with the same parameters, and its earlier
trial stays COMPLETE with the value it had at the lower rung (Optuna cannot change a finished
trial). A sampler reading every trial would count that configuration twice, once at a low and
once at a high fidelity. `LineageSampler` wraps Optuna's sampler and shows it the study
without those superseded trials, and without running continuations (their parameters are
fixed, not the sampler's to spread out), so each candidate is one observation.

And all at one fidelity (`at_common_rung`): a candidate's last value may come from 30 or from
2,700 steps, and a model fit to both learns the schedule rather than the architecture. As
BOHB fits its model per budget and SMAC uses the highest fidelity with enough samples, the
sampler sees each candidate's search score at the highest rung that at least MIN_AT_RUNG
candidates reached; a candidate that stopped below it was not promoted there (it ranked
below the top 1/eta of its rung) and is shown as pruned, which Optuna's samplers rank below
every completed trial. Everything else is the wrapped sampler's own.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nas.search.objectives import curve_metric
from nas.search.record import TrialRecord, study_objectives
from nas.search.scoring import search_score, superseded_numbers

# Candidates a rung needs before the sampler learns at it (TPE's below group is a tenth of
# the observations, so fewer would leave it nothing to model).
MIN_AT_RUNG = 5


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


def common_rung(trials: Sequence[FrozenTrial]) -> int | None:
    """The highest rung (epochs) that at least MIN_AT_RUNG candidates reached, else the
    lowest; None for a study without rungs (trials nas did not write)."""
    rungs = sorted({r for t in trials for r in TrialRecord.of(t).rungs})
    if not rungs:
        return None
    reached = [
        sum(1 for t in trials if t.state == TrialState.COMPLETE and r in t.intermediate_values)
        for r in rungs
    ]
    enough = [r for r, n in zip(rungs, reached, strict=True) if n >= MIN_AT_RUNG]
    return enough[-1] if enough else rungs[0]


def at_common_rung(trials: Sequence[FrozenTrial], score_index: int | None) -> list[FrozenTrial]:
    """`trials` (one per candidate) as the sampler sees them: each completed one with its
    score objective (at `score_index` of its values; None: not what the curves hold, left as
    it is) taken at the common rung, or pruned there if it stopped below it."""
    rung = common_rung(trials)
    if rung is None or score_index is None:
        return list(trials)
    seen = []
    for trial in trials:
        if trial.state != TrialState.COMPLETE or not trial.values:
            seen.append(trial)
            continue
        view = copy.copy(trial)
        if rung in trial.intermediate_values:
            values = list(trial.values)
            values[score_index] = search_score(trial.intermediate_values, rung)
            view.values = values
        else:
            view.state, view.values = TrialState.PRUNED, None
        seen.append(view)
    return seen


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
        5.1): here intermediate values are validation IoU (or case Dice), higher better."""
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
        seen = at_common_rung(latest_observations(trials), self._score_index)
        return seen if states is None else [t for t in seen if t.state in states]

    @functools.cached_property
    def _score_index(self) -> int | None:
        """Where the curves' score (IoU, or case Dice: `curve_metric`) stands among the
        study's values; None where it is not one of them."""
        names = study_objectives(self._study).names
        metric = curve_metric(names)
        return names.index(metric) if metric in names else None

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
