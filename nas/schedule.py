"""How a run spends its trials: the rungs, the budget, and which stopped candidate trains on.

`Schedule` holds a run's limits (new candidates, optimiser steps, the deadline) and its rungs;
after every trial `StopAtTotal` enqueues the promotion most due (nas/fidelity.py decides which
is due) or stops the worker once the study has no more work. Reads trials, never trains.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.fidelity import (
    Budget,
    Promotion,
    batches_per_epoch,
    final_extension,
    lineage,
    promotions,
    rung_epochs,
    spending,
)
from nas.space import SearchSpace
from nas.study import is_new, settled_count
from nas.train_config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    """How a run spends its trials: at most `n_trials` new candidates, promoted through
    `rungs` (epochs) within `budget_steps` and the run's deadline (time.monotonic())."""

    rungs: tuple[int, ...]
    eta: int
    n_trials: int
    budget_steps: int | None = None
    deadline: float | None = None

    @classmethod
    def of(cls, space: SearchSpace, deadline: float | None = None) -> Schedule:
        cfg = space.study
        rungs = rung_epochs(cfg.fidelity, max_epochs(space))
        return cls(rungs, cfg.fidelity.eta, cfg.n_trials, cfg.budget, deadline)

    def budget(self) -> Budget:
        left = None if self.deadline is None else self.deadline - time.monotonic()
        return Budget(self.budget_steps, left)

    def allows_new(self, trials: Sequence[FrozenTrial]) -> bool:
        running = sum(1 for t in trials if t.state == TrialState.RUNNING and is_new(t))
        if settled_count(trials) + running >= self.n_trials:
            return False
        return self.budget().allows_new(spending(trials), self.rungs, self.eta)


def max_epochs(space: SearchSpace) -> int:
    """The top rung: `train.epochs`, which a multi-fidelity search needs fixed."""
    epochs = space.train.get("epochs", TrainConfig.__pydantic_fields__["epochs"].default)
    if not isinstance(epochs, int):
        raise ValueError("is the top rung of the search's fidelity: give one value, not a spec")
    return epochs


def has_work(trials: Sequence[FrozenTrial], schedule: Schedule) -> bool:
    """Whether a trial is waiting to be (re)run or continued, a promotion is due, or a new
    candidate may start."""
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    return schedule.allows_new(trials) or _next_promotion(trials, schedule) is not None


def _next_promotion(trials: Sequence[FrozenTrial], schedule: Schedule) -> Promotion | None:
    """The first due promotion that fits the budget: below the top rung, in at most 1/eta of
    what is left. In the endgame the best candidate still learning at the top trains on first:
    eta times longer, or else for all that is left; the others only once it has converged or
    nothing it could use is left."""
    endgame = not schedule.allows_new(trials)
    budget, spent = schedule.budget(), spending(trials)
    budgeted = budget.steps is not None or budget.seconds_left is not None
    by_number = {t.number: t for t in trials}

    def affordable_epochs(trial: FrozenTrial) -> int:
        steps = budget.steps_left(spent, _seconds_per_step(trial)) or 0.0
        return int(steps // batches_per_epoch(trial))

    due = promotions(trials, schedule.rungs, schedule.eta, endgame, budgeted)
    for index, promotion in enumerate(due):
        trial = by_number[promotion.number]
        steps = (promotion.to_epoch - promotion.rung) * batches_per_epoch(trial)
        share = 1.0 if promotion.extends else 1.0 / schedule.eta
        if budget.affords(spent, steps, _seconds_per_step(trial), share):
            return promotion
        if promotion.extends and index == 0:
            fill = final_extension(promotion, trial, affordable_epochs)
            if fill is not None:
                return fill
    return None


def enqueue_promotion(
    study: optuna.Study, schedule: Schedule, trials: Sequence[FrozenTrial] | None = None
) -> Promotion | None:
    """Enqueue the continuation of the stopped candidate most due for promotion, if any;
    `trials`: the study's trials when the caller has just read them."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    promotion = _next_promotion(trials, schedule)
    if promotion is not None:
        parent = next(t for t in trials if t.number == promotion.number)
        attrs = {"continues": parent.number, "lineage": lineage(parent)}
        if promotion.extends:  # a promotion below the top trains on to the top rung
            attrs["until"] = promotion.to_epoch
        study.enqueue_trial(parent.params, user_attrs=attrs)
    return promotion


def _seconds_per_step(trial: FrozenTrial) -> float | None:
    steps = trial.user_attrs.get("steps", 0)
    return trial.user_attrs.get("segment_seconds", 0.0) / steps if steps else None


class StopAtTotal:
    """Optuna callback after each trial: enqueue a due promotion, and stop this worker once
    the study has no more work (`has_work`)."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return
        promoted = enqueue_promotion(study, self.schedule, trials)
        if promoted is None and not self.schedule.allows_new(trials):
            study.stop()
