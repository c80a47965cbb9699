"""The budget split: what a search may spend (optimiser steps, the time left), what it has
spent, and the shares of it new candidates, promotions and the endgame get (MO-ASHA).

The budget: total optimiser steps (`study.budget`), or, with only a timeout, the steps the
remaining time allows at the speed measured so far. FINAL_SHARE of it is kept for the endgame;
successive halving over the rungs gets the rest. It spends about the same on every rung, so
new candidates may use 1 / (1 + K (1 - 1/eta)) of that (K rungs above the lowest) and the rest
is kept for promotions. While new candidates may start, a promotion may take at most 1/eta of
what is left, so that one slow candidate cannot spend the search on itself.

Pure functions over Optuna's FrozenTrial records, read through nas/search/record.py's
TrialRecord (`continues`, `steps`, `segment_seconds` (training and validation), `rungs`,
`batches_per_epoch`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial

from nas.search.record import TrialRecord


def new_candidate_share(rungs: Sequence[int], eta: int) -> float:
    """The share of a budget successive halving spends on the lowest rung."""
    return 1.0 / (1.0 + (len(rungs) - 1) * (1.0 - 1.0 / eta))


def exploration_share(rungs: Sequence[int], eta: int) -> float:
    """The share of a budget new candidates may use: the lowest rung's share of what successive
    halving gets (all of it with one fidelity, where nothing is trained longer)."""
    if len(rungs) == 1:
        return 1.0
    return (1.0 - FINAL_SHARE) * new_candidate_share(rungs, eta)


# The share of a multi-fidelity budget kept for the endgame, training the front's candidates
# beyond where successive halving left them. On real MRI (benchmarks/search_vs_hand.py,
# B = 480 s) a search that spent its whole budget on successive halving trained its best for
# 300 steps, where a hand-made U-Net trained for the budget took 3,980 and beat it. Half kept
# (with promotions capped at 1/eta of what is left) raised the front's best held-out IoU from
# 0.767 to 0.814; ranking on cost too, 0.841; at B = 960 s, with the share counted in seconds
# and the best trained on first, 0.856.
FINAL_SHARE = 0.5
# The share of the time left a final extension leaves unplanned: a candidate's speed varies a
# little from segment to segment, and the front is still to be scored.
TIME_MARGIN = 0.05


@dataclass(frozen=True)
class Spending:
    steps: int  # optimiser steps trained by every trial so far
    new_steps: int  # of which by candidates up to their lowest rung
    seconds: float = 0.0  # the time those steps took, validation included
    new_seconds: float = 0.0  # of which by candidates up to their lowest rung

    @property
    def seconds_per_step(self) -> float | None:
        """Measured over all trials; None before any."""
        return self.seconds / self.steps if self.steps else None


def spending(trials: Sequence[FrozenTrial]) -> Spending:
    steps = new_steps = 0
    seconds = new_seconds = 0.0
    for record in map(TrialRecord.of, trials):
        trial_steps, trial_seconds = record.steps, record.segment_seconds
        steps += trial_steps
        seconds += trial_seconds
        if record.continues is None and trial_steps:  # new, perhaps promoted in the same trial
            lowest_rung = record.rungs[0] if record.rungs else math.inf
            lowest = min(trial_steps, lowest_rung * record.batches_per_epoch)
            new_steps += lowest
            new_seconds += trial_seconds * lowest / trial_steps
    return Spending(steps, new_steps, seconds, new_seconds)


def batches_per_epoch(trial: FrozenTrial) -> int:
    return TrialRecord.of(trial).batches_per_epoch


@dataclass(frozen=True)
class Budget:
    """What a search may spend: total steps and/or the seconds left in this run."""

    steps: int | None
    seconds_left: float | None

    def total_steps(self, spent: Spending) -> float | None:
        """The steps the study may reach: the budget, or what the time left allows at the
        measured speed (None: unlimited, or no speed measured yet)."""
        limits = []
        if self.steps is not None:
            limits.append(float(self.steps))
        if self.seconds_left is not None and spent.seconds_per_step:
            limits.append(spent.steps + self.seconds_left / spent.seconds_per_step)
        return min(limits) if limits else None

    def allows_new(self, spent: Spending, rungs: Sequence[int], eta: int) -> bool:
        """Whether a new candidate may start: the lowest rung's share is not used up, counted
        in steps when the budget is in steps, else in seconds (a 3D step may cost ten 2D
        ones: under a deadline the share is of the time)."""
        share = exploration_share(rungs, eta)
        half = 1.0 if len(rungs) == 1 else 1.0 - FINAL_SHARE
        if self.steps is None and self.seconds_left is not None:
            total_seconds = spent.seconds + self.seconds_left
            return (
                spent.new_seconds < share * total_seconds and spent.seconds < half * total_seconds
            )
        total = self.total_steps(spent)
        return total is None or (spent.new_steps < share * total and spent.steps < half * total)

    def affords_while_exploring(
        self, spent: Spending, steps: int, seconds_per_step: float | None, eta: int
    ) -> bool:
        """Whether a promotion while new candidates may still start fits: at most 1/eta of
        what is left, and within the share successive halving gets (1 - FINAL_SHARE), so that
        the endgame keeps its half for the front."""
        if not self.affords(spent, steps, seconds_per_step, 1.0 / eta):
            return False
        if self.steps is not None and spent.steps + steps > (1 - FINAL_SHARE) * self.steps:
            return False
        speed = seconds_per_step or spent.seconds_per_step
        if self.seconds_left is not None and speed is not None:
            total_seconds = spent.seconds + self.seconds_left
            return spent.seconds + steps * speed <= (1 - FINAL_SHARE) * total_seconds
        return True

    def affords(
        self, spent: Spending, steps: int, seconds_per_step: float | None, share: float = 1.0
    ) -> bool:
        """Whether training `steps` more fits `share` of the steps and the time left."""
        if self.steps is not None and steps > share * (self.steps - spent.steps):
            return False
        speed = seconds_per_step or spent.seconds_per_step
        if self.seconds_left is not None and speed is not None:
            return steps * speed <= share * self.seconds_left
        return True

    def steps_left(self, spent: Spending, seconds_per_step: float | None) -> float | None:
        """The steps that fit what is left (None: unlimited), the time kept a margin of
        TIME_MARGIN as the candidate's measured speed may vary."""
        limits = []
        if self.steps is not None:
            limits.append(float(self.steps - spent.steps))
        speed = seconds_per_step or spent.seconds_per_step
        if self.seconds_left is not None and speed:
            limits.append((1 - TIME_MARGIN) * self.seconds_left / speed)
        return max(0.0, min(limits)) if limits else None
