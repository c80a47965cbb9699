"""The rung ladder: the epochs at which candidates are compared, where a candidate trains to
next, and where the segments of a training end.

Every candidate first trains to the lowest rung (a few epochs); each rung trains eta times
longer than the one below it, up to `train.epochs`, the top rung. Each segment of training
ends at a rung with its learning rate decayed (nas/search/trial.py trains one segment per
rung, `segment_ends`), so the weights a rung ranks are annealed; a promoted candidate
restarts its decay (warm restarts, as in SGDR). Beyond the top rung a candidate trains eta
times longer at each level (`next_level`). Pure arithmetic on epochs; reads no trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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


def next_level(epoch: int, rungs: Sequence[int], eta: int) -> int:
    """Where a candidate at `epoch` trains to next: the next rung, or eta times longer at the
    top rung or beyond."""
    return next((r for r in rungs if r > epoch), epoch * eta)


def is_rung_at_or_above(epoch: int, top: int, eta: int) -> bool:
    """Whether `epoch` is the top rung or a level beyond it (the top times a power of eta)."""
    while epoch > top and epoch % eta == 0:
        epoch //= eta
    return epoch == top


def segment_ends(epoch: int, until: int, rungs: Sequence[int]) -> list[int]:
    """Where the segments of a training from `epoch` to `until` end: at each rung between
    them, and at `until`."""
    return [r for r in rungs if epoch < r < until] + [until]
