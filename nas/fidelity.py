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

The budget: total optimiser steps (`study.budget`), or, with only a timeout, the steps the
remaining time allows at the speed measured so far. FINAL_SHARE of it is kept for the endgame,
training the best candidates long; successive halving over the rungs gets the rest. It spends
about the same on every rung, so new candidates may use 1 / (1 + K (1 - 1/eta)) of that (K
rungs above the lowest) and the rest is kept for promotions. While new candidates may start, a
promotion may take at most 1/eta of what is left, so that one slow candidate cannot spend the
search on itself. When no more new candidates may start, the best candidates still below the
top rung are promoted while the budget lasts, so a search never ends with its best candidates
at the lowest fidelity. In the endgame the candidate with the best IoU at the top rung that
is still learning (IoU up by MIN_GAIN over its last rung) comes first: it trains eta times
longer again, or, when that no longer fits, for all that is left (`final_extension`); the
others at the top, then the rungs below, get what it cannot use. The front's best end trained
to convergence for their size, or for the budget.

Pure functions over Optuna's FrozenTrial records: the trial attributes read here are written by
nas/objective.py and nas/schedule.py (`lineage`, `continues`, `until`, `epochs_run`, `steps`,
`segment_seconds` (training and validation), `n_params`, `macs`, `rungs`, `unet_config`,
`train_config`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field

from nas.objectives import TIMED


class FidelityConfig(BaseModel):
    """type: asha (multi-fidelity), or none to train every candidate for `train.epochs`.
    min_epochs: the lowest rung; eta: a rung promotes 1/eta of its candidates, each rung
    trains eta times longer than the one below it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["asha", "none"] = "asha"
    min_epochs: int = Field(2, ge=1)
    eta: int = Field(3, ge=2, le=10)


def rung_epochs(cfg: FidelityConfig, max_epochs: int) -> tuple[int, ...]:
    """The epochs at which candidates are compared: max_epochs / eta^k for k = K .. 0, the
    lowest at least `min_epochs` (anchored at the top, as Hyperband does)."""
    if cfg.type == "none" or cfg.min_epochs >= max_epochs:
        return (max_epochs,)
    levels = int(math.floor(math.log(max_epochs / cfg.min_epochs) / math.log(cfg.eta) + 1e-9))
    rungs = {
        max(cfg.min_epochs, round(max_epochs / cfg.eta ** (levels - k))) for k in range(levels + 1)
    }
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


# The share of a multi-fidelity budget kept for training the best candidates beyond the top
# rung. On real MRI (benchmarks/search_vs_hand.py, B = 480 s) a search that spent its whole
# budget on successive halving trained its best for 300 steps, where a hand-made U-Net trained
# for the budget took 3,980 and beat it. Half kept (with promotions capped at 1/eta of what
# is left) raised the front's best held-out IoU from 0.767 to 0.814; ranking on cost too, 0.841;
# at B = 960 s, with the share counted in seconds and the best trained on first, 0.856.
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
    attrs = trial.user_attrs
    costs = tuple(float(attrs[name]) for name in TIMED if name in attrs)
    return Member(
        trial.number, lineage(trial), int(attrs["n_params"]), iou, step_macs(trial), costs
    )


def step_macs(trial: FrozenTrial) -> float:
    """Multiply-accumulates of one training step's forward pass (one patch's times the batch):
    what a step costs, the same on every machine. A 3D network, or a wide first stage, may
    cost ten times a 2D network of the same size."""
    attrs = trial.user_attrs
    dims = attrs.get("unet_config", {}).get("spatial_dims", 2)
    batch = attrs.get("train_config", {}).get(f"batch_size_{dims}d", 1)
    return float(attrs.get("macs", 0)) * batch


def lineage(trial: FrozenTrial) -> int:
    return int(trial.user_attrs.get("lineage", trial.number))


def lineage_attrs(trial: FrozenTrial) -> dict[str, int]:
    """The attributes a rerun of `trial` (after an interrupt or a lost worker) carries, so
    that a continuation is rerun as a continuation."""
    keys = ("continues", "lineage", "until")
    return {k: int(trial.user_attrs[k]) for k in keys if k in trial.user_attrs}


def continued(trials: Sequence[FrozenTrial]) -> set[int]:
    """Trials whose state another trial continues (or is about to)."""
    return {int(t.user_attrs["continues"]) for t in trials if "continues" in t.user_attrs}


def rung_members(trials: Sequence[FrozenTrial], epoch: int) -> list[Member]:
    """One member per candidate that reached `epoch`, from the latest trial of its lineage."""
    members: dict[int, Member] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state not in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED):
            continue
        iou = trial.intermediate_values.get(epoch)
        if iou is None or "n_params" not in trial.user_attrs:
            continue
        members[lineage(trial)] = member(trial, iou)
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
    better, worse = _criteria(one, width), _criteria(other, width)
    return all(b >= w for b, w in zip(better, worse, strict=True)) and better != worse


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
            trial = by_number[member.number]
            return (
                trial.state == TrialState.COMPLETE
                and trial.user_attrs.get("epochs_run") == epoch
                and not trial.user_attrs.get("stopped_by_time")
                and trial.number not in taken
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
    return (extensions(trials, rungs, eta) if endgame and budgeted else []) + due


def extensions(trials: Sequence[FrozenTrial], rungs: Sequence[int], eta: int) -> list[Promotion]:
    """Candidates at the top rung or beyond that are still learning, best IoU first: each
    may train eta times longer (another rung above the top) while a budget lasts, so that
    the best candidates end trained to convergence for their size. Still learning: its IoU
    rose by at least MIN_GAIN over its last rung. Beyond the top the ranking is by IoU, not
    by sorting: on real MRI the smallest network of a front (a boundary, so first by
    crowding) took 112 s of a 960 s search and got worse, ahead of the best one."""
    if len(rungs) == 1:  # one fidelity: every candidate trains train.epochs, no more
        return []
    taken = continued(trials)
    top = rungs[-1]
    waiting: list[Member] = []
    for trial in trials:
        epoch = trial.user_attrs.get("epochs_run")
        usable = (
            trial.state == TrialState.COMPLETE
            and trial.number not in taken
            and not trial.user_attrs.get("stopped_by_time")
            and isinstance(epoch, int)
            and _is_rung_at_or_above(epoch, top, eta)
            and "n_params" in trial.user_attrs
        )
        if not usable:
            continue
        if not still_learning(trial, rungs, eta):
            continue
        iou = trial.intermediate_values[epoch]
        waiting.append(member(trial, iou))
    by_number = {t.number: t for t in trials}
    return [
        Promotion(m.number, e, e * eta, extends=True)
        for m in sorted(waiting, key=lambda m: -m.iou)
        for e in [by_number[m.number].user_attrs["epochs_run"]]
    ]


def final_extension(
    best: Promotion, trial: FrozenTrial, affordable_epochs: Callable[[FrozenTrial], int]
) -> Promotion | None:
    """The last use of a budget: the best still-learning candidate (`best`, the first of
    `extensions`, continuing `trial`) trains on for as many epochs as are left
    (`affordable_epochs(trial)`), when that is at least MIN_FINAL_GROWTH of what it has
    trained."""
    more = affordable_epochs(trial)
    if more >= max(1, MIN_FINAL_GROWTH * best.rung):
        return Promotion(best.number, best.rung, best.rung + more, True)
    return None


def still_learning(trial: FrozenTrial, rungs: Sequence[int], eta: int) -> bool:
    """Whether a candidate that ended at a rung rose by MIN_GAIN over the rung below it."""
    epoch = trial.user_attrs.get("epochs_run")
    curve = trial.intermediate_values
    if epoch not in curve:
        return False
    below = rungs[rungs.index(epoch) - 1] if epoch in rungs[1:] else epoch // eta
    return below not in curve or curve[epoch] - curve[below] >= MIN_GAIN


def may_continue(trial: FrozenTrial) -> bool:
    """Whether the search may still train this completed candidate further: it stopped at a
    rung below the top, or at the top or beyond while still learning (multi-fidelity only).
    Its weights and training state are kept while it may."""
    rungs = trial.user_attrs.get("rungs")
    epoch = trial.user_attrs.get("epochs_run")
    if not rungs or len(rungs) == 1 or trial.user_attrs.get("stopped_by_time"):
        return False
    if epoch in rungs[:-1]:
        return True
    eta = max(2, round(rungs[-1] / rungs[-2]))  # the schedule's eta, as recorded by its rungs
    return (
        isinstance(epoch, int)
        and _is_rung_at_or_above(epoch, rungs[-1], eta)
        and (still_learning(trial, rungs, eta))
    )


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
    for trial in trials:
        attrs = trial.user_attrs
        trial_steps = int(attrs.get("steps", 0))
        trial_seconds = float(attrs.get("segment_seconds", 0.0))
        steps += trial_steps
        seconds += trial_seconds
        if "continues" not in attrs and trial_steps:  # new, perhaps promoted in the same trial
            lowest = min(trial_steps, attrs.get("rungs", [math.inf])[0] * batches_per_epoch(trial))
            new_steps += lowest
            new_seconds += trial_seconds * lowest / trial_steps
    return Spending(steps, new_steps, seconds, new_seconds)


def batches_per_epoch(trial: FrozenTrial) -> int:
    return int(trial.user_attrs.get("train_config", {}).get("batches_per_epoch", 1))


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
        if self.steps is None and self.seconds_left is not None:
            return spent.new_seconds < share * (spent.seconds + self.seconds_left)
        total = self.total_steps(spent)
        return total is None or spent.new_steps < share * total

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
