"""How a run spends its trials: the rungs, the budget, and which stopped candidate trains on.

`Schedule` holds a run's limits (new candidates, optimiser steps, the deadline) and its rungs;
after every trial `StopAtTotal` enqueues the promotion most due (ranking.py and endgame.py
decide which is due, budget.py whether it fits) or stops the worker once the study has no
more work. Reads trials, never trains.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.search.objectives import curve_metric
from nas.search.record import TrialRecord
from nas.search.schedule.budget import Budget, batches_per_epoch, spending
from nas.search.schedule.continuation import Promotion, promotion_attrs, trains_until
from nas.search.schedule.endgame import final_fill, parity_promotions, standings
from nas.search.schedule.pruner import PrunerConfig, dominated_at_epoch
from nas.search.schedule.ranking import in_top, promotions, rung_members
from nas.search.schedule.rungs import rung_epochs
from nas.search.scoring import first_cut_is_weak, search_score
from nas.search.space import SearchSpace
from nas.search.study import is_new, settled_count
from nas.training.train_config import TrainConfig


@dataclass(frozen=True)
class EpochReport:
    """What a training candidate reports after an epoch, for `Schedule.after_epoch`."""

    number: int  # its trial
    lineage: int  # the trial it started in
    epoch: int
    curve: Mapping[int, float]  # its validation IoU (or case Dice) by epoch, across rungs
    costs: Mapping[str, float | None]  # its objectives to minimise (for the pruner)
    steps_per_epoch: int
    seconds_per_step: float  # measured in this trial, validation included
    rungs: tuple[int, ...]  # where its segments end (`Schedule.new_candidate_rungs`)


@dataclass(frozen=True)
class Verdict:
    go_on: bool
    pruned: str | None = None  # why the pruner stopped it (None: not pruned)


@dataclass(frozen=True)
class Schedule:
    """How a run spends its trials: at most `n_trials` new candidates, promoted through
    `rungs` (epochs) within `budget_steps` and the run's deadline (time.monotonic()).

    The one home of the stop-or-promote policy, with two questions: `after_epoch` (does a
    training candidate go on?) and `next_promotion` (which stopped candidate trains on
    next?), and how far a continuation trains (`continuation_until`). The modules beside it
    hold the parts: rungs.py the rung ladder, ranking.py successive halving's ranking,
    endgame.py the parity across the front, budget.py the budget split, continuation.py the
    lineage bookkeeping, pruner.py the pruner's rule; all answer only through here."""

    rungs: tuple[int, ...]
    eta: int
    n_trials: int
    budget_steps: int | None = None
    deadline: float | None = None
    pruner: PrunerConfig = PrunerConfig(type="none")
    metric: str = "iou"  # what the curves hold and the front is on (`curve_metric`)

    @classmethod
    def of(cls, space: SearchSpace, deadline: float | None = None) -> Schedule:
        cfg = space.study
        rungs = rung_epochs(cfg.fidelity, max_epochs(space), fewest_batches_per_epoch(space))
        return cls(rungs, cfg.fidelity.eta, cfg.n_trials, cfg.budget, deadline, cfg.pruner,
                   curve_metric(cfg.objectives))  # fmt: skip

    def after_epoch(self, trials: Sequence[FrozenTrial], report: EpochReport) -> Verdict:
        """At a rung below the top: go on while in its top 1/eta (by non-dominated sorting)
        and the next rung takes at most 1/eta of the budget left. Elsewhere: go on unless the
        pruner finds it dominated at equal fidelity."""
        if report.epoch in report.rungs[:-1]:
            if not in_top(rung_members(trials, report.epoch), self.eta, report.lineage):
                return Verdict(False)
            index = report.rungs.index(report.epoch)
            steps = (report.rungs[index + 1] - report.epoch) * report.steps_per_epoch
            fits = self.budget().affords_while_exploring(
                spending(trials), steps, report.seconds_per_step, self.eta
            )
            return Verdict(fits)
        score = search_score(report.curve, report.epoch)
        if dominated_at_epoch(self.pruner, trials, report.number, report.costs, report.epoch,
                              score):  # fmt: skip
            return Verdict(False, f"stopped at epoch {report.epoch}: dominated by cheaper networks")
        return Verdict(True)

    def new_candidate_rungs(self, trials: Sequence[FrozenTrial]) -> tuple[int, ...]:
        """The rungs a new candidate trains through: all of them, or from the second where
        the first cut predicts the next rung's ranking weakly (`scoring.first_cut_is_weak`),
        so that new candidates are first ranked where ranking means something."""
        return self.rungs[1:] if first_cut_is_weak(trials, self.rungs) else self.rungs

    def next_promotion(self, trials: Sequence[FrozenTrial]) -> Promotion | None:
        return _next_promotion(trials, self)

    def continuation_until(self, until: int | None, epoch: int) -> int:
        """The epoch a continuation from `epoch`, enqueued with `until`, trains to
        (`continuation.trains_until`)."""
        return trains_until(until, epoch, self.rungs, self.eta)

    def time_left(self) -> float | None:
        """Seconds to the run's deadline (negative once past); None without a timeout."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def budget(self) -> Budget:
        return Budget(self.budget_steps, self.time_left())

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


def fewest_batches_per_epoch(space: SearchSpace) -> int:
    """The shortest epoch, in optimiser steps, of any candidate the space draws."""
    from nas.search.space_spec import IntSpec

    entry = space.train.get("batches_per_epoch", TrainConfig().batches_per_epoch)
    if isinstance(entry, int):
        return entry
    return min(spec.low if isinstance(spec, IntSpec) else min(spec.choices) for spec in entry)


def has_work(trials: Sequence[FrozenTrial], schedule: Schedule) -> bool:
    """Whether a trial is waiting to be (re)run or continued, a promotion is due, or a new
    candidate may start."""
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    return schedule.allows_new(trials) or schedule.next_promotion(trials) is not None


def _next_promotion(trials: Sequence[FrozenTrial], schedule: Schedule) -> Promotion | None:
    """The first due promotion that fits the budget. While new candidates may start:
    successive halving's, below the top rung, each in at most 1/eta of what is left. In the
    endgame with a budget: the front's members, the least trained first, each to its next
    level; when none fits, the best takes what is left (`endgame.final_fill`)."""
    endgame = not schedule.allows_new(trials)
    budget, spent = schedule.budget(), spending(trials)
    budgeted = budget.steps is not None or budget.seconds_left is not None
    by_number = {t.number: t for t in trials}

    def steps(promotion: Promotion) -> int:
        return (promotion.to_epoch - promotion.rung) * batches_per_epoch(
            by_number[promotion.number]
        )

    def speed(promotion: Promotion) -> float | None:
        return _seconds_per_step(by_number[promotion.number])

    if endgame and budgeted:
        # Read once for both questions: after every trial, and in `has_work`.
        everyone = standings(trials, schedule.rungs, schedule.eta)
        for promotion in parity_promotions(everyone, schedule.rungs, schedule.eta):
            if budget.affords(spent, steps(promotion), speed(promotion)):
                return promotion

        def affordable_epochs(trial: FrozenTrial) -> int:
            steps = budget.steps_left(spent, _seconds_per_step(trial)) or 0.0
            return int(steps // batches_per_epoch(trial))

        fill = final_fill(everyone, affordable_epochs, schedule.metric)
        if fill is not None:
            return fill
        # The front has nothing left to train that fits: successive halving's due promotions,
        # each rung's best, rather than ending with the budget unspent.
    due = promotions(trials, schedule.rungs, schedule.eta, endgame, budgeted)
    if endgame:  # nothing to keep for later
        return next((p for p in due if budget.affords(spent, steps(p), speed(p))), None)
    return next(
        (p for p in due if budget.affords_while_exploring(spent, steps(p), speed(p), schedule.eta)),
        None,
    )


def enqueue_promotion(
    study: optuna.Study, schedule: Schedule, trials: Sequence[FrozenTrial] | None = None
) -> Promotion | None:
    """Enqueue the continuation of the stopped candidate most due for promotion, if any;
    `trials`: the study's trials when the caller has just read them."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    promotion = schedule.next_promotion(trials)
    if promotion is not None:
        parent = next(t for t in trials if t.number == promotion.number)
        study.enqueue_trial(parent.params, user_attrs=promotion_attrs(parent, promotion))
    return promotion


def _seconds_per_step(trial: FrozenTrial) -> float | None:
    record = TrialRecord.of(trial)
    return record.segment_seconds / record.steps if record.steps else None


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
