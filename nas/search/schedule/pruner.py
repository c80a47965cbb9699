"""Stop candidates that are dominated at equal fidelity, without harming the Pareto front.

Optuna refuses `Trial.report`/`should_prune` in multi-objective studies, and its median rule
would be wrong here anyway: a small network with a modest IoU may be exactly the point a user
wants. The parameter count is known before training starts, so after each epoch the question
is IoU *given size*: a candidate is stopped when at least `k` other trials with no more
parameters (no more of every objective to minimise: MACs, latency, memory) had a higher
validation IoU by the same epoch. A candidate that is the best seen
at its size is never stopped, however low its IoU. Learning curves are read from the trials'
intermediate values, which the objective stores through the study's storage. Both sides are
compared on the search's one score at that epoch (nas/search/scoring.py: the mean of the last
validations), as the rungs and the front compare them: the curves of small networks trained
for a few epochs jump by 0.2 from one epoch to the next, and one bad epoch should not decide.

Why this rule rather than successive halving within size strata: it needs no strata
boundaries or rung schedule, and it can only stop a candidate that k smaller-or-equal
networks already beat, so the front it could lose is bounded by what is already known.

Defaults (warm-up 1 epoch, k 2, min_trials 2), from benchmarks/search_efficiency.py on the
default space, 240 s per run, seeds 0-2, 2 CPU cores; median hypervolume at half the budget
and at the end: NSGA-II without pruning 0.395 / 0.553, random search 0.422 / 0.585, NSGA-II
with warm-up 2 and min_trials 4 0.422 / 0.665 (reaches the unpruned final at 60% of the
budget), with warm-up 1 and min_trials 2 0.576 / 0.657 (at 50%). Measured again once each
trial's initial weights came from its seed: 0.608 / 0.627 without pruning, random 0.613 /
0.635, the defaults 0.609 / 0.662 (at 60%). Seeds differ more than arms do (final hypervolume
0.44-0.67 per arm): the defaults end highest in the median of both measurements, by a
small margin. The early candidates are where time goes: the reference network and NSGA-II's
first generation run before anything can be compared, so the pruner must act from the second
epoch and the third trial. These figures predate validation on fixed patches
(nas/search/scoring.py):
they were taken when every epoch validated the whole volumes, and are not yet measured again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from optuna.trial import FrozenTrial
from pydantic import BaseModel, ConfigDict, Field

from nas.search.objectives import dominates
from nas.search.record import TrialRecord
from nas.search.scoring import search_score


class PrunerConfig(BaseModel):
    """type: pareto, or none to train every candidate to the end.
    warmup_epochs: epochs every candidate trains before it can be stopped.
    k: how many smaller-or-equal, better trials it takes to stop a candidate.
    min_trials: trials that must have reached an epoch before anyone is stopped there.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["pareto", "none"] = "pareto"
    warmup_epochs: int = Field(1, ge=0)
    k: int = Field(2, ge=1)
    min_trials: int = Field(2, ge=1)


def dominated_at_epoch(
    cfg: PrunerConfig,
    trials: Iterable[FrozenTrial],
    number: int,
    costs: Mapping[str, float | None],
    epoch: int,
    iou: float,
) -> bool:
    """Whether trial `number` should stop now.

    costs: its objectives to minimise (parameters by default; MACs, latency or memory as the
    study says), all known before training; iou: its search score at `epoch`
    (`scoring.search_score`). A peer counts against it when it dominates it with a higher IoU: costs
    no more on every one of them and scores higher.
    """
    if cfg.type == "none" or epoch <= cfg.warmup_epochs:
        return False
    peers = []
    for trial in trials:
        record = TrialRecord.of(trial)
        theirs = {name: record.quantity(name) for name in costs}
        if trial.number == number or epoch not in record.curve or None in theirs.values():
            continue
        peers.append((theirs, search_score(record.curve, epoch)))
    if len(peers) < cfg.min_trials:
        return False
    known = [name for name, mine in costs.items() if mine is not None]

    def point(value: float, quantities: Mapping[str, float | None]) -> list[float]:
        return [-value, *(quantities[name] for name in known)]

    mine = point(iou, costs)
    # Dominance with a strictly higher IoU: a smaller network that only ties it stops no one.
    better = sum(
        1 for theirs, value in peers if value > iou and dominates(point(value, theirs), mine)
    )
    return better >= cfg.k


def validation_every(every: int | None, cfg: PrunerConfig) -> int | None:
    """How often a trial validates besides the epochs its rungs read: every `every` epochs
    as the study says, else every epoch with the pruner on, which compares curves epoch by
    epoch (None: only where a decision reads)."""
    return every or (1 if cfg.type != "none" else None)
