"""One typed record of a trial, read from Optuna's FrozenTrial, and the study's objectives.

The objective (nas/objective.py) writes a trial's measurements, scores and training history as
Optuna user attrs, under the names below; results, report, export, retrain, the pruner and the
hypervolume read them through `TrialRecord` alone, and never a trial's `values` by position:
`record.quantity(name)` is an objective's value whatever the study's objectives are. Studies
written before a field existed read it as None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState, create_trial

from nas.errors import NasError
from nas.objectives import DEFAULT_OBJECTIVES, OBJECTIVES, Objective, score_of, values_of

# The study's user attrs holding its objectives and, for the record, its constraints (a study
# from before they were configurable has neither: [iou, params], no constraints).
OBJECTIVES_ATTR = "objectives"
CONSTRAINTS_ATTR = "constraints"
# Where each quantity is kept among a trial's user attrs.
QUANTITY_ATTRS = {
    "iou": "val_iou",
    "dice": "val_dice",
    "params": "n_params",
    "macs": "macs",
    "latency_ms": "latency_ms",
    "memory_mb": "memory_mb",
}
LATENCY_IQR_ATTR = "latency_iqr_ms"
REJECTED_ATTR = "rejected"  # the constraint a candidate broke before it trained


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: TrialState
    params: Mapping[str, Any]
    quantities: Mapping[str, float | None]  # by objective name; None: not measured
    unet_config: Mapping[str, Any]
    train_config: Mapping[str, Any]
    curve: Mapping[int, float]  # validation IoU by epoch, across rungs
    epochs_run: int | None = None
    fidelity_steps: int | None = None
    continues: int | None = None
    seconds: float | None = None
    device: str | None = None
    summary: str = ""
    fail_reason: str | None = None
    rejected: str | None = None
    violations: tuple[float, ...] = ()  # Optuna's constraint values: <= 0 when one holds
    latency_iqr_ms: float | None = None
    completed_at: datetime | None = None

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        """The record of `trial`; a finished trial's is read once per object (Optuna's cached
        storage hands out the same object for it on every read, and it no longer changes)."""
        if not trial.state.is_finished():
            return cls._read(trial)
        cached = _FINISHED.get(id(trial))
        if cached is not None and cached[0] is trial:
            return cached[1]
        if len(_FINISHED) >= _FINISHED_MAX:
            _FINISHED.clear()
        record = cls._read(trial)
        _FINISHED[id(trial)] = (trial, record)
        return record

    @classmethod
    def _read(cls, trial: FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        quantities = {name: _number(attrs.get(attr)) for name, attr in QUANTITY_ATTRS.items()}
        return cls(
            number=trial.number,
            state=trial.state,
            params=trial.params,
            quantities=quantities,
            unet_config=attrs.get("unet_config", {}),
            train_config=attrs.get("train_config", {}),
            curve=trial.intermediate_values,
            epochs_run=attrs.get("epochs_run"),
            fidelity_steps=attrs.get("fidelity_steps"),
            continues=attrs.get("continues"),
            seconds=attrs.get("seconds"),
            device=attrs.get("device"),
            summary=attrs.get("summary", ""),
            fail_reason=attrs.get("fail_reason"),
            rejected=attrs.get(REJECTED_ATTR),
            violations=tuple(trial.constraints.values()),
            latency_iqr_ms=_number(attrs.get(LATENCY_IQR_ATTR)),
            completed_at=trial.datetime_complete,
        )

    def quantity(self, name: str) -> float | None:
        return self.quantities[name]

    @property
    def iou(self) -> float | None:
        return self.quantities["iou"]

    @property
    def n_params(self) -> int | None:
        value = self.quantities["params"]
        return None if value is None else int(value)

    @property
    def spatial_dims(self) -> int | None:
        return self.unet_config.get("spatial_dims")

    @property
    def complete(self) -> bool:
        return self.state == TrialState.COMPLETE

    @property
    def feasible(self) -> bool:
        """No constraint broken (a study without constraints: always)."""
        return self.rejected is None and all(v <= 0 for v in self.violations)


# Records of finished trials by the id of their FrozenTrial, holding the trial itself so that
# the id cannot be reused while the entry lives; cleared when full.
_FINISHED: dict[int, tuple[FrozenTrial, TrialRecord]] = {}
_FINISHED_MAX = 20_000


def records(trials: Sequence[FrozenTrial]) -> list[TrialRecord]:
    return [TrialRecord.of(t) for t in trials]


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class StudyObjectives:
    """A study's objectives, in the order of its values."""

    objectives: tuple[Objective, ...]

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def score(self) -> Objective:
        """The objective the tools rank by when they pick one (`objectives.score_of`)."""
        return OBJECTIVES[score_of(self.names)]


def study_objectives(study: optuna.Study) -> StudyObjectives:
    names = study.user_attrs.get(OBJECTIVES_ATTR, list(DEFAULT_OBJECTIVES))
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise NasError(study.study_name, f"records unknown objective(s) {unknown}")
    return StudyObjectives(tuple(OBJECTIVES[n] for n in names))


def rerun_trial(
    source: FrozenTrial,
    scores: Mapping[str, float],
    objectives: Sequence[str],
    user_attrs: Mapping[str, Any],
    curve: Mapping[int, float],
) -> FrozenTrial:
    """A finished trial of `source`'s network trained again (nas.retrain, a fold of
    nas.crossval): its costs as the search measured them, `scores` (iou, dice, params) from
    the new training, `curve` its IoU per epoch."""
    record = TrialRecord.of(source)
    quantities = {name: record.quantity(name) for name in QUANTITY_ATTRS} | dict(scores)
    measured = {QUANTITY_ATTRS[k]: v for k, v in quantities.items() if v is not None}
    return create_trial(
        values=values_of(quantities, objectives),
        params=source.params,
        distributions=source.distributions,
        user_attrs={**user_attrs, **measured},
        intermediate_values=dict(curve),
    )
