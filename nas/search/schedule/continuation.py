"""Continuation bookkeeping: the lineage a continuation carries, which stopped candidates
may still train on (and so keep their weights and training state), and how far a
continuation trains.

A candidate that reaches a rung while it is in the top continues in the same trial; one that
climbs into the top later, as worse candidates arrive, is continued by a new trial, enqueued
with the trial it continues, the lineage's first trial and, beyond the top rung, the epoch it
trains `until`. Pure functions over Optuna's FrozenTrial records, read through
nas/search/record.py's TrialRecord (`lineage`, `continues`, `until`, `epochs_run`, `rungs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from nas.search.record import TrialRecord, carried
from nas.search.schedule.rungs import is_rung_at_or_above
from nas.search.scoring import smoothed

# The rise in validation IoU over its last rung below which a candidate at the top rung or
# beyond counts as converged and is not trained longer.
MIN_GAIN = 0.005


@dataclass(frozen=True)
class Promotion:
    """A stopped candidate's next training: the trial it continues, from where, to where."""

    number: int  # the trial to continue
    rung: int  # from this rung's epoch
    to_epoch: int
    extends: bool = False  # beyond the top rung: the endgame's training of the best


def lineage(trial: FrozenTrial) -> int:
    """The trial the candidate of `trial` started in."""
    return TrialRecord.of(trial).lineage_root


def lineage_attrs(trial: FrozenTrial) -> dict[str, int]:
    """The attributes a rerun of `trial` (after an interrupt or a lost worker) carries, so
    that a continuation is rerun as a continuation."""
    record = TrialRecord.of(trial)
    return carried(continues=record.continues, lineage=record.lineage, until=record.until)


def promotion_attrs(parent: FrozenTrial, promotion: Promotion) -> dict[str, int]:
    """The attributes the trial continuing `parent` for `promotion` is enqueued with."""
    # Beyond the top rung it trains `until`; successive halving's go on rung by rung.
    until = promotion.to_epoch if promotion.extends else None
    return carried(continues=parent.number, lineage=lineage(parent), until=until)


def trains_until(until: int | None, epoch: int, rungs: Sequence[int], eta: int) -> int:
    """The epoch a continuation from `epoch` trains to: `until` as it was enqueued (beyond the
    top rung), else the top rung, or eta times longer for a candidate already at the top or
    beyond in a study from before `until` was recorded."""
    top = rungs[-1]
    if until is not None:  # trained beyond the top rung, as the schedule says
        return until
    if epoch >= top:  # (a study from before `until` was recorded)
        return epoch * eta
    return top


def continued(trials: Sequence[FrozenTrial]) -> set[int]:
    """Trials whose state another trial continues (or is about to)."""
    continuing = (TrialRecord.of(t).continues for t in trials)
    return {int(n) for n in continuing if n is not None}


def still_learning(trial: FrozenTrial, rungs: Sequence[int], eta: int) -> bool:
    """Whether a candidate that ended at a rung rose by MIN_GAIN over the rung below it."""
    epoch = TrialRecord.of(trial).epochs_run
    curve = trial.intermediate_values
    if epoch not in curve:
        return False
    below = rungs[rungs.index(epoch) - 1] if epoch in rungs[1:] else epoch // eta
    return below not in curve or smoothed(curve, epoch) - smoothed(curve, below) >= MIN_GAIN


def may_continue(trial: FrozenTrial, superseded: set[int]) -> bool:
    """Whether the search may still train this finished trial further, so that its weights
    and training state are kept: it completed, no later trial continued and completed it
    (`superseded`: `scoring.superseded_numbers`), and it stopped at a rung below the top, or
    at the top or beyond while still learning (multi-fidelity only)."""
    return (
        trial.state == TrialState.COMPLETE
        and trial.number not in superseded
        and _may_train_further(trial)
    )


def _may_train_further(trial: FrozenTrial) -> bool:
    rungs = TrialRecord.of(trial).rungs
    if len(rungs) <= 1:
        return False
    eta = max(2, round(rungs[-1] / rungs[-2]))  # the schedule's eta, as recorded by its rungs
    return trainable(trial, rungs, eta)


def trainable(trial: FrozenTrial, rungs: Sequence[int], eta: int) -> bool:
    """Whether a completed candidate may train on: it stopped by its schedule (not by the
    time) at a rung below the top, or at the top or a level beyond while still learning."""
    record = TrialRecord.of(trial)
    epoch = record.epochs_run
    if len(rungs) == 1 or record.stopped_by_time or not isinstance(epoch, int):
        return False
    if epoch in rungs[:-1]:
        return True
    return is_rung_at_or_above(epoch, rungs[-1], eta) and still_learning(trial, rungs, eta)
