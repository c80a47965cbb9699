"""The endgame: fidelity parity across the front once no new candidate may start.

Rather than one winner, every candidate that no other beats at equal fidelity (one trained at
least as long, with no more parameters and a higher IoU at the epoch it reached) and that may
train on climbs one level (the next rung, or eta times longer beyond the top while still
learning), the least trained first (`parity_promotions`). When no level fits what is left, the
best of them trains on for the rest, but not past 1/PARITY_SHARE times the steps of the least
trained front member of similar cost (`final_fill`); when the front has nothing that fits,
successive halving's due promotions use the rest (nas/search/schedule/policy.py). A front
member trained fewer than PARITY_SHARE of the steps of such a neighbour is marked
(`undertrained`). Pure functions over Optuna's FrozenTrial records, read through
nas/search/record.py's TrialRecord.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from nas.search.objectives import dominates
from nas.search.record import TrialRecord
from nas.search.schedule.budget import batches_per_epoch
from nas.search.schedule.continuation import Promotion, continued, trainable
from nas.search.schedule.rungs import next_level
from nas.search.scoring import front_of, search_score

# A final extension shorter than this fraction of what the candidate has trained is not
# worth its restart of the learning-rate schedule.
MIN_FINAL_GROWTH = 0.5

# Fidelity parity on the front. A front member trained fewer than PARITY_SHARE of the steps
# of the longest-trained member of similar cost (parameters within a factor of SIMILAR_COST)
# is marked as trained far less (`undertrained` in pareto.csv), and the endgame's last fill
# stops short of making one.
PARITY_SHARE = 0.25
SIMILAR_COST = 10.0


@dataclass(frozen=True)
class Standing:
    """Where one candidate's training stands, read from the latest trial of its lineage."""

    trial: FrozenTrial
    epoch: int  # epochs trained
    steps: int  # optimiser steps trained
    n_params: int
    open: bool  # the search may train it on now: stopped, not continued, not converged

    def score(self, epoch: int | None = None) -> float:
        """Its search score (`scoring.search_score`) at `epoch`, default the last."""
        return search_score(self.trial.intermediate_values, self.epoch if epoch is None else epoch)


def standings(trials: Sequence[FrozenTrial], rungs: Sequence[int], eta: int) -> list[Standing]:
    """One standing per candidate that has trained at least an epoch."""
    taken = continued(trials)
    latest: dict[int, tuple[FrozenTrial, TrialRecord]] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        record = TrialRecord.of(trial)
        if (
            trial.state in (TrialState.COMPLETE, TrialState.RUNNING)
            and record.epochs_run in trial.intermediate_values
            and record.n_params is not None
        ):
            latest[record.lineage_root] = (trial, record)
    return [
        Standing(
            trial,
            record.epochs_run,
            record.epochs_run * record.batches_per_epoch,
            record.n_params,
            record.complete and trial.number not in taken and trainable(trial, rungs, eta),
        )
        for trial, record in latest.values()
    ]


def _beats_at_equal_fidelity(one: Standing, other: Standing) -> bool:
    """Whether `one`, trained at least as long as `other`, dominates it on (IoU, parameters)
    with its IoU taken at the epoch `other` reached: a large network stopped early is not
    beaten by a small one trained long. A less trained candidate beats none: on real MRI
    nearly every network scores about 0.5 after three epochs, and the smallest stub, compared
    at that epoch, "beat" the whole front."""
    if one.epoch < other.epoch:
        return False
    epoch = other.epoch
    return dominates((-one.score(epoch), one.n_params), (-other.score(), other.n_params))


def equal_fidelity_front(everyone: Sequence[Standing]) -> list[Standing]:
    """The candidates no other beats at equal fidelity: those worth training on."""
    return [s for s in everyone if not any(_beats_at_equal_fidelity(o, s) for o in everyone)]


def own_fidelity_front(everyone: Sequence[Standing], metric: str = "iou") -> list[Standing]:
    """The candidates on the front a run would report now (`scoring.front_of`), on (the
    search score, parameters); `metric`: what the score is (`objectives.curve_metric`)."""
    on_front = {t.number for t in front_of([s.trial for s in everyone], (metric, "params"))}
    return [s for s in everyone if s.trial.number in on_front]


def parity_promotions(
    everyone: Sequence[Standing], rungs: Sequence[int], eta: int
) -> list[Promotion]:
    """The endgame's order: every candidate on the front at equal fidelity that may train on,
    the least trained first (ties: best IoU first), each to its next level (the next rung,
    or eta times longer). Shared this way, the front's members climb together, so that the
    front a run reports compares networks trained alike; small networks are cheap per step,
    so their share costs the best little."""
    front = [s for s in equal_fidelity_front(everyone) if s.open]
    front.sort(key=lambda s: (s.steps, -s.score()))
    return [
        Promotion(s.trial.number, s.epoch, next_level(s.epoch, rungs, eta), extends=True)
        for s in front
    ]


def final_fill(
    everyone: Sequence[Standing],
    affordable_epochs: Callable[[FrozenTrial], int],
    metric: str = "iou",
) -> Promotion | None:
    """The last use of a budget, once no next level fits: the best candidate on the front
    that may train on trains for what is left (`affordable_epochs(trial)`), at most until it
    has 1/PARITY_SHARE times the steps of the least trained front member of similar cost,
    and only if that is at least MIN_FINAL_GROWTH of what it has trained; else the next
    best may. `metric`: what the search score is (`objectives.curve_metric`)."""
    reported = own_fidelity_front(everyone, metric)
    for best in sorted(equal_fidelity_front(everyone), key=lambda s: -s.score()):
        if not best.open:
            continue
        more = affordable_epochs(best.trial)
        neighbours = [o.steps for o in reported if o is not best and similar_cost(o, best)]
        if neighbours:
            cap = int(min(neighbours) / PARITY_SHARE) // batches_per_epoch(best.trial)
            more = min(more, cap - best.epoch)
        if more >= max(1, MIN_FINAL_GROWTH * best.epoch):
            return Promotion(best.trial.number, best.epoch, best.epoch + more, True)
    return None


def similar_cost(one: Standing, other: Standing) -> bool:
    return _within(one.n_params, other.n_params)


def _within(one: int, other: int) -> bool:
    return max(one, other) <= SIMILAR_COST * max(1, min(one, other))


def undertrained(members: Sequence[tuple[int, int]]) -> list[bool]:
    """For front members given as (parameters, steps trained): whether each trained fewer
    than PARITY_SHARE of the steps of the longest-trained member of similar cost."""
    return [
        steps < PARITY_SHARE * max(s for p, s in members if _within(p, params))
        for params, steps in members
    ]
