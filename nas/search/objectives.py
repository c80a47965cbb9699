"""What a search optimises and what it must respect: the table of objectives and constraints.

Every quantity a study can optimise or bound is one row of OBJECTIVES: its name (as written
in the YAML), its direction, the trial record's field it is read from, whether it is known
before training (so a constraint on it rejects a candidate before any training is spent),
and how it is measured. A study's objectives are 2 or 3 of them, `[iou, params]` by default,
kept in the study's user attrs so that every tool that opens the study later reads them back.
Every list of their names is derived from the table here: the user attrs that keep them,
those measured only when asked, trials.csv's columns and the report's front table. Adding an
objective is one row here plus the code that measures it (nas/search/measure.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Direction = Literal["maximize", "minimize"]


class LatencyConfig(BaseModel):
    """Where latency is measured. device: cpu, cuda, mps (default: the search's device);
    threads: CPU threads for the measurement (default: as the search runs); batch: windows
    per forward pass."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    device: str | None = Field(None, pattern=r"^(cpu|mps|cuda(:[0-9]+)?)$")
    threads: int | None = Field(None, ge=1, le=1024)
    batch: int = Field(1, ge=1, le=1024)


@dataclass(frozen=True)
class Objective:
    name: str
    direction: Direction
    label: str  # axis and column title
    before_training: bool  # measured on the built network, before it trains
    how: str  # how it is measured, for the README and the report
    attr: str  # the trial's user attr that keeps it, and its column in trials.csv
    # Costs time to measure: measured only when an objective or a constraint names it.
    timed: bool = False
    # Recorded only by studies since it was added: a table shows it where a trial has it.
    recent: bool = False
    spread_attr: str | None = None  # the attr of its spread over repeated measurements

    @property
    def maximise(self) -> bool:
        return self.direction == "maximize"


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("iou", "maximize", "validation IoU", False,
                  "foreground IoU on the validation cases at the fidelity reached",
                  attr="val_iou"),
        Objective("dice", "maximize", "validation Dice", False,
                  "foreground Dice on the validation cases at the fidelity reached",
                  attr="val_dice"),
        Objective("case_dice", "maximize", "validation case Dice", False,
                  "foreground Dice of each validation case, averaged over the cases (a case "
                  "holding a class neither in truth nor in prediction left out), at the "
                  "fidelity reached",
                  attr="val_case_dice", recent=True),
        Objective("params", "minimize", "parameters", True,
                  "trainable parameters of the built network, counted exactly",
                  attr="n_params"),
        Objective("macs", "minimize", "MACs per window", True,
                  "multiply-accumulates of one forward pass over one inference window",
                  attr="macs"),
        Objective("latency_ms", "minimize", "latency (ms)", True,
                  "median wall-clock of one forward pass of the inference window, eval mode, "
                  "no autograd, after warm-up, on `study.latency`'s device and threads",
                  attr="latency_ms", timed=True, spread_attr="latency_iqr_ms"),
        Objective("memory_mb", "minimize", "peak memory (MB)", True,
                  "peak memory of that forward pass: the CUDA allocator's peak on a GPU, the "
                  "estimate of nas.network.memory (weights, kept activations, x1.5) elsewhere",
                  attr="memory_mb", timed=True),
    )
}  # fmt: skip
DEFAULT_OBJECTIVES = ("iou", "params")
# The measured quantities that cost time to measure: only when an objective or a constraint
# names them.
TIMED = tuple(name for name, o in OBJECTIVES.items() if o.timed)

# An objective's name as a space may write it (pydantic refuses any other).
Name = Literal[tuple(OBJECTIVES)]  # type: ignore[valid-type]
# The scores a search's learning curves can hold (`curve_metric`).
CURVE_METRICS = ("iou", "case_dice")

# Where each quantity is kept among a trial's user attrs.
QUANTITY_ATTRS = {name: o.attr for name, o in OBJECTIVES.items()}
_SCORES = [o for o in OBJECTIVES.values() if o.maximise]
_COSTS = [o for o in OBJECTIVES.values() if not o.maximise]
_PARAMS = OBJECTIVES["params"].attr
# The columns of a score or cost that a table shows only where some trial has them.
MEASURED_ONLY_WHEN_ASKED = (
    *(o.attr for o in OBJECTIVES.values() if o.timed),
    *(o.attr for o in OBJECTIVES.values() if o.recent),
)
# trials.csv's columns, always present so an empty table still has its header: the scores,
# the held-out scores, the parameters, how the trial ran, the other costs (each with its
# spread), and whether it kept the constraints.
METRIC_COLUMNS = [
    "number", "state", *(o.attr for o in _SCORES), "test_iou", "test_dice", _PARAMS,
    "seconds", "spatial_dims", "epochs_run", "fidelity_steps", "continues", "device",
    "fail_reason",
    *(a for o in _COSTS if o.attr != _PARAMS for a in (o.attr, o.spread_attr) if a),
    "rejected", "feasible", "summary",
]  # fmt: skip
# The report's front table: each score (a curve's with its standard error and its score on
# whole volumes), the held-out scores, the costs, and how far each member trained.
FRONT_COLUMNS = [
    "number",
    *(a for o in _SCORES
      for a in ((o.attr, f"{o.attr}_se", f"volume_{o.attr}") if o.name in CURVE_METRICS
                else (o.attr,))),
    "test_iou", "test_dice", *(o.attr for o in _COSTS), "epochs_run", "fidelity_steps",
    "undertrained", "below_top_rung", "continues", "seconds", "summary",
]  # fmt: skip


class Bound(BaseModel):
    """A constraint on one quantity: at least `min`, at most `max`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max:g}) is below min ({self.min:g})")
        return self

    def violation(self, value: float | None) -> float:
        """How far `value` is outside the bound (<= 0: inside; 0 when unknown)."""
        if value is None:
            return 0.0
        over = value - self.max if self.max is not None else -np.inf
        under = self.min - value if self.min is not None else -np.inf
        return float(max(over, under))


def score_of(names: Sequence[str]) -> str:
    """The objective the tools rank by and draw on the y axis: the first maximised (IoU,
    Dice or case Dice), else the first."""
    return next((n for n in names if OBJECTIVES[n].maximise), names[0])


def curve_metric(names: Sequence[str]) -> str:
    """What a study's learning curves hold, and so what its rungs, pruner and sampler compare
    and its search score smooths: per-case Dice where the score objective (`score_of`) is
    `case_dice`, else IoU (`dice` as an objective is its last validation's, ranked on IoU)."""
    return "case_dice" if score_of(names) == "case_dice" else "iou"


def directions(names: Sequence[str]) -> list[str]:
    return [OBJECTIVES[name].direction for name in names]


def values_of(quantities: Mapping[str, float | None], names: Sequence[str]) -> list[float]:
    """A trial's objective values, in the study's order, from its measured quantities."""
    return [float(quantities[name]) for name in names]  # type: ignore[arg-type]


def violations(
    quantities: Mapping[str, float | None], constraints: Mapping[str, Bound]
) -> list[float]:
    """One value per constraint, in name order (Optuna's constraints_func: <= 0 feasible)."""
    return [constraints[name].violation(quantities.get(name)) for name in sorted(constraints)]


def rejection(quantities: Mapping[str, float | None], constraints: Mapping[str, Bound]) -> str:
    """The first violated constraint in words, or '' when all hold (unknowns hold)."""
    for name in sorted(constraints):
        bound, value = constraints[name], quantities.get(name)
        if value is None or bound.violation(value) <= 0:
            continue
        if bound.max is not None and value > bound.max:
            return f"{name} {value:,.4g} > max {bound.max:,.4g}"
        return f"{name} {value:,.4g} < min {bound.min:,.4g}"
    return ""


def as_minimised(points: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Objective values (rows: trials) with maximised columns negated."""
    signs = np.array([-1.0 if OBJECTIVES[n].maximise else 1.0 for n in names])
    return np.asarray(points, dtype=float) * signs


def non_dominated(points: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """A mask of the rows no other row dominates (no worse on every objective, better on
    one); equal rows are all kept, as Optuna's best_trials does."""
    return _pareto_mask(as_minimised(points, names))


def dominates(one: Sequence[float], other: Sequence[float]) -> bool:
    """Whether `one` dominates `other`, both with every entry minimised: no worse on any,
    better on one. The one dominance rule of nas: the front, the rung ranking and the
    pruner all ask it."""
    return all(a <= b for a, b in zip(one, other, strict=True)) and any(
        a < b for a, b in zip(one, other, strict=True)
    )


def _pareto_mask(low: np.ndarray) -> np.ndarray:
    """Rows of `low` (every column minimised) that no other row dominates. In lexicographic
    order a row's dominators all come before it, and whatever dominates a dominator is on
    the front and dominates the row too: each row is checked against the front so far."""
    low = np.asarray(low, dtype=float)
    mask = np.zeros(len(low), dtype=bool)
    front = np.empty((0, low.shape[1] if low.ndim == 2 else 0))
    for index in np.lexsort(low.T[::-1]) if len(low) else []:
        point = low[index]
        if not any(dominates(member, point) for member in front):
            mask[index] = True
            front = np.vstack([front, point])
    return mask


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by `points` (rows, every column minimised) and bounded by
    `reference`: exact, by slicing along the last objective (k = 2 or 3 here)."""
    points = np.asarray(points, dtype=float)
    if len(points):
        points = points[(points < reference).all(axis=1)]
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    points = points[_pareto_mask(points)]
    order = np.argsort(points[:, -1])
    points = points[order]
    volume = 0.0
    for index, point in enumerate(points):
        top = points[index + 1, -1] if index + 1 < len(points) else reference[-1]
        if top > point[-1]:
            volume += (top - point[-1]) * hypervolume(points[: index + 1, :-1], reference[:-1])
    return volume
