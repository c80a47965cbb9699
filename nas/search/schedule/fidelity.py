"""Who trains next and for how long: asynchronous successive halving over a planned budget.

Every candidate first trains to the lowest rung (a few epochs). At each rung the candidates
that reached it are ranked by non-dominated sorting on (validation IoU, parameters, compute
per step), ties within a front broken by crowding distance, as in MO-ASHA (Schmucker et al.
2021) with the cost of training on as a third criterion: a candidate in the top 1/eta of its
rung is promoted, continues from its own state (weights, optimizer, epoch) to the next rung,
and so on up to `train.epochs`, the top rung. A candidate that reaches a rung while it is in
the top continues in the same trial; one that climbs into the top later, as worse candidates
arrive, is continued by a new trial. Ranking by sorting rather than by IoU alone keeps a small
or cheap network with a modest IoU climbing if nothing smaller or cheaper beats it.

Each segment of training ends at a rung with its learning rate decayed (nas/search/trial.py
trains one segment per rung), so the weights a rung ranks are annealed; a promoted candidate
restarts its decay (warm restarts, as in SGDR). Rungs rank, and "still learning" compares,
the search score (nas/search/scoring.py: the mean of the last validations), not a single epoch's.

The budget: total optimiser steps (`study.budget`), or, with only a timeout, the steps the
remaining time allows at the speed measured so far. FINAL_SHARE of it is kept for the endgame;
successive halving over the rungs gets the rest. It spends about the same on every rung, so
new candidates may use 1 / (1 + K (1 - 1/eta)) of that (K rungs above the lowest) and the rest
is kept for promotions. While new candidates may start, a promotion may take at most 1/eta of
what is left, so that one slow candidate cannot spend the search on itself.

The endgame (no more new candidates) gives the front fidelity parity rather than one winner:
every candidate that no other beats at equal fidelity (one trained at least as long, with no
more parameters and a higher IoU at the epoch it reached) and that may train on climbs one
level (the next rung, or eta times longer beyond the top while still learning), the least
trained first (`parity_promotions`). When no level fits what is left, the best of them trains
on for the rest, but not past 1/PARITY_SHARE times the steps of the least trained front
member of similar cost (`final_fill`); when the front has nothing that fits, successive
halving's due promotions use the rest. A front member trained fewer than PARITY_SHARE of the
steps of such a neighbour is marked (`undertrained`).

"IoU" here is what the learning curves hold: per-case Dice in a study whose score objective
is `case_dice` (`objectives.curve_metric`), which the rungs then rank on.

Pure functions over Optuna's FrozenTrial records, read through nas/search/record.py's TrialRecord
(`lineage`, `continues`, `until`, `epochs_run`, `steps`, `segment_seconds` (training and
validation), `n_params`, `macs`, `rungs`, `train_config`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field

from nas.search.objectives import TIMED, dominates
from nas.search.record import TrialRecord, carried
from nas.search.scoring import front_of, search_score, smoothed


class FidelityConfig(BaseModel):
    """type: asha (multi-fidelity), or none to train every candidate for `train.epochs`.
    min_epochs: the lowest rung; min_steps: and at least this many optimiser steps
    (epochs x batches_per_epoch), so that the first ranking sees networks past their first
    few steps; eta: a rung promotes 1/eta of its candidates, each rung trains eta times
    longer than the one below it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["asha", "none"] = "asha"
    min_epochs: int = Field(2, ge=1)
    min_steps: int | None = Field(None, ge=1)
    eta: int = Field(3, ge=2, le=10)

    def lowest_epochs(self, batches_per_epoch: int) -> int:
        """The lowest rung, in epochs of `batches_per_epoch` steps."""
        from_steps = math.ceil((self.min_steps or 0) / batches_per_epoch)
        return max(self.min_epochs, from_steps)


def rung_epochs(
    cfg: FidelityConfig, max_epochs: int, batches_per_epoch: int = 1
) -> tuple[int, ...]:
    """The epochs at which candidates are compared: max_epochs / eta^k for k = K .. 0, the
    lowest at least `min_epochs` and `min_steps` (anchored at the top, as Hyperband does)."""
    lowest = cfg.lowest_epochs(batches_per_epoch)
    if cfg.type == "none" or lowest >= max_epochs:
        return (max_epochs,)
    levels = int(math.floor(math.log(max_epochs / lowest) / math.log(cfg.eta) + 1e-9))
    rungs = {max(lowest, round(max_epochs / cfg.eta ** (levels - k))) for k in range(levels + 1)}
    return tuple(sorted(rungs))


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
# A final extension shorter than this fraction of what the candidate has trained is not
# worth its restart of the learning-rate schedule.
MIN_FINAL_GROWTH = 0.5

# The rise in validation IoU over its last rung below which a candidate at the top rung or
# beyond counts as converged and is not trained longer.
MIN_GAIN = 0.005


@dataclass(frozen=True)
class Member:
    number: int  # the trial holding this candidate's latest state
    lineage: int  # the trial the candidate started in
    n_params: int
    iou: float  # validation IoU at the rung
    step_macs: float = 0.0  # the compute of one training step (0: not recorded)
    # Latency and peak memory, where the study measures them (an objective or constraint).
    costs: tuple[float, ...] = ()


def member(trial: FrozenTrial, iou: float) -> Member:
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


def lineage(trial: FrozenTrial) -> int:
    return TrialRecord.of(trial).lineage_root


def lineage_attrs(trial: FrozenTrial) -> dict[str, int]:
    """The attributes a rerun of `trial` (after an interrupt or a lost worker) carries, so
    that a continuation is rerun as a continuation."""
    record = TrialRecord.of(trial)
    return carried(continues=record.continues, lineage=record.lineage, until=record.until)


def continued(trials: Sequence[FrozenTrial]) -> set[int]:
    """Trials whose state another trial continues (or is about to)."""
    continuing = (TrialRecord.of(t).continues for t in trials)
    return {int(n) for n in continuing if n is not None}


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


@dataclass(frozen=True)
class Promotion:
    number: int  # the trial to continue
    rung: int  # from this rung's epoch
    to_epoch: int
    extends: bool = False  # beyond the top rung: the endgame's training of the best


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


def next_level(epoch: int, rungs: Sequence[int], eta: int) -> int:
    """Where a candidate at `epoch` trains to next: the next rung, or eta times longer at the
    top rung or beyond."""
    return next((r for r in rungs if r > epoch), epoch * eta)


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
            record.complete and trial.number not in taken and _trainable(trial, rungs, eta),
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


def still_learning(trial: FrozenTrial, rungs: Sequence[int], eta: int) -> bool:
    """Whether a candidate that ended at a rung rose by MIN_GAIN over the rung below it."""
    epoch = TrialRecord.of(trial).epochs_run
    curve = trial.intermediate_values
    if epoch not in curve:
        return False
    below = rungs[rungs.index(epoch) - 1] if epoch in rungs[1:] else epoch // eta
    return below not in curve or smoothed(curve, epoch) - smoothed(curve, below) >= MIN_GAIN


def may_continue(trial: FrozenTrial) -> bool:
    """Whether the search may still train this completed candidate further: it stopped at a
    rung below the top, or at the top or beyond while still learning (multi-fidelity only).
    Its weights and training state are kept while it may."""
    rungs = TrialRecord.of(trial).rungs
    if len(rungs) <= 1:
        return False
    eta = max(2, round(rungs[-1] / rungs[-2]))  # the schedule's eta, as recorded by its rungs
    return _trainable(trial, rungs, eta)


def _trainable(trial: FrozenTrial, rungs: Sequence[int], eta: int) -> bool:
    record = TrialRecord.of(trial)
    epoch = record.epochs_run
    if len(rungs) == 1 or record.stopped_by_time or not isinstance(epoch, int):
        return False
    if epoch in rungs[:-1]:
        return True
    return _is_rung_at_or_above(epoch, rungs[-1], eta) and still_learning(trial, rungs, eta)


def _is_rung_at_or_above(epoch: int, top: int, eta: int) -> bool:
    while epoch > top and epoch % eta == 0:
        epoch //= eta
    return epoch == top


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


# The share of the time left a final extension leaves unplanned: a candidate's speed varies a
# little from segment to segment, and the front is still to be scored.
TIME_MARGIN = 0.05
