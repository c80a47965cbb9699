"""Ranking by non-dominated sorting, and successive halving's choice of whom to promote.

At each rung the candidates that reached it are ranked by non-dominated sorting on (validation
IoU, parameters, compute per step), ties within a front broken by crowding distance, as in
MO-ASHA (Schmucker et al. 2021) with the cost of training on as a third criterion: a
candidate in the top 1/eta of its rung is promoted and continues from its own state (weights,
optimizer, epoch) to the next rung. Ranking by sorting rather than by IoU alone keeps a small
or cheap network with a modest IoU climbing if nothing smaller or cheaper beats it. Rungs rank
the search score (nas/search/scoring.py: the mean of the last validations), not a single
epoch's.

"IoU" here is what the learning curves hold: per-case Dice in a study whose score objective
is `case_dice` (`objectives.curve_metric`), which the rungs then rank on. Pure functions over
Optuna's FrozenTrial records, read through nas/search/record.py's TrialRecord (`n_params`,
`macs`, `train_config`, `epochs_run`, `stopped_by_time`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from optuna.trial import FrozenTrial, TrialState

from nas.search.objectives import TIMED, dominates
from nas.search.record import TrialRecord
from nas.search.schedule.continuation import Promotion, continued, lineage
from nas.search.scoring import smoothed


@dataclass(frozen=True)
class Member:
    """A candidate as a rung ranks it: its score there and what it costs."""

    number: int  # the trial holding this candidate's latest state
    lineage: int  # the trial the candidate started in
    n_params: int
    iou: float  # validation IoU at the rung
    step_macs: float = 0.0  # the compute of one training step (0: not recorded)
    # Latency and peak memory, where the study measures them (an objective or constraint).
    costs: tuple[float, ...] = ()


def member(trial: FrozenTrial, iou: float) -> Member:
    """`trial`'s candidate as a member of a rung where it scored `iou`."""
    record = TrialRecord.of(trial)
    costs = tuple(c for c in map(record.quantity, TIMED) if c is not None)
    return Member(trial.number, record.lineage_root, record.n_params, iou, step_macs(trial), costs)


def step_macs(trial: FrozenTrial) -> float:
    """Multiply-accumulates of one training step's forward pass (one patch's times the batch):
    what a step costs, the same on every machine. A 3D network, or a wide first stage, may
    cost ten times a 2D network of the same size."""
    record = TrialRecord.of(trial)
    batch = record.train_config.get(f"batch_size_{record.spatial_dims or 2}d", 1)
    return (record.quantity("macs") or 0.0) * batch


def rung_members(trials: Sequence[FrozenTrial], epoch: int) -> list[Member]:
    """One member per candidate that reached `epoch`, from the latest trial of its lineage."""
    members: dict[int, Member] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state not in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED):
            continue
        if epoch not in trial.intermediate_values or TrialRecord.of(trial).n_params is None:
            continue
        members[lineage(trial)] = member(trial, smoothed(trial.intermediate_values, epoch))
    return list(members.values())


def rank(members: Sequence[Member]) -> list[Member]:
    """Best first: non-dominated fronts on (max IoU, min params, min step cost, and min latency
    and memory where the study measures them), each by crowding distance. The step cost enters
    because the budget is spent in compute: at equal steps a network costing ten times more
    per step must beat a cheap one on IoU or size to train on ahead of it."""
    left = list(members)
    ranked: list[Member] = []
    while left:
        front = [m for m in left if not any(_dominates(o, m) for o in left)]
        distance = _crowding(front)
        ranked += sorted(front, key=lambda m: (-distance[m.lineage], -m.iou, m.n_params))
        left = [m for m in left if m not in front]
    return ranked


def _criteria(member: Member, width: int) -> tuple[float, ...]:
    """What a member is ranked on, every one to maximise: IoU, fewer parameters, cheaper
    steps, and lower latency and memory where all members have them (`width` of them)."""
    costs = member.costs if len(member.costs) == width else (0.0,) * width
    return (member.iou, -member.n_params, -member.step_macs, *(-c for c in costs))


def _dominates(one: Member, other: Member) -> bool:
    width = len(one.costs) if len(one.costs) == len(other.costs) else 0
    return dominates([-c for c in _criteria(one, width)], [-c for c in _criteria(other, width)])


def _crowding(front: Sequence[Member]) -> dict[int, float]:
    distance = {m.lineage: 0.0 for m in front}
    widths = {len(m.costs) for m in front}
    width = widths.pop() if len(widths) == 1 else 0

    def cost(index: int) -> Callable[[Member], float]:
        return lambda m: math.log(max(m.costs[index], 1e-9))

    keys = (
        lambda m: m.iou,
        lambda m: math.log(max(m.n_params, 1)),
        lambda m: math.log(max(m.step_macs, 1.0)),
        *(cost(i) for i in range(width)),
    )
    for key in keys:
        ordered = sorted(front, key=key)
        span = key(ordered[-1]) - key(ordered[0])
        if span == 0:  # all alike on this criterion (costs not recorded): no boundary to keep
            continue
        distance[ordered[0].lineage] = distance[ordered[-1].lineage] = math.inf
        for before, member, after in zip(ordered, ordered[1:], ordered[2:], strict=False):
            distance[member.lineage] += (key(after) - key(before)) / span
    return distance


def in_top(members: Sequence[Member], eta: int, root: int) -> bool:
    """Whether the candidate started in trial `root` is among the top 1/eta of `members`."""
    top = rank(members)[: len(members) // eta]
    return any(m.lineage == root for m in top)


def promotions(
    trials: Sequence[FrozenTrial],
    rungs: Sequence[int],
    eta: int,
    endgame: bool,
    budgeted: bool = True,
) -> list[Promotion]:
    """Stopped candidates due to continue, highest rung first.

    A candidate is due when it stopped at a rung below the top and is now in that rung's top
    1/eta. In the endgame (no new candidate may start) the best-ranked stopped candidate of
    each rung is due too: while the budget lasts, or, with no budget (`budgeted` False), only
    until one candidate of that rung went higher.
    """
    taken = continued(trials)
    by_number = {t.number: t for t in trials}
    due: list[Promotion] = []
    for index in reversed(range(len(rungs) - 1)):
        epoch = rungs[index]
        members = rung_members(trials, epoch)

        def stopped_here(member: Member, epoch: int = epoch) -> bool:
            record = TrialRecord.of(by_number[member.number])
            return (
                record.complete
                and record.epochs_run == epoch
                and not record.stopped_by_time
                and record.number not in taken
            )

        ranked = rank(members)
        top = ranked[: len(members) // eta]
        here = [Promotion(m.number, epoch, rungs[index + 1]) for m in top if stopped_here(m)]
        went_higher = any(rungs[index + 1] in by_number[m.number].intermediate_values
                          for m in members)  # fmt: skip
        if endgame and not here and (budgeted or not went_higher):
            waiting = [m for m in ranked if stopped_here(m)]
            if waiting:
                here.append(Promotion(waiting[0].number, epoch, rungs[index + 1]))
        due += here
    return due
