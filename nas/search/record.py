"""One typed record of a trial, read from Optuna's FrozenTrial, and the study's objectives.

A trial's measurements, scores, training history and lineage are kept as Optuna user attrs.
This module is where their names live: `write` stores fields on a running trial (the
objective, the heartbeat), `carried` builds the attrs a trial is enqueued or added with (a
promotion, a retry, a retrain or a fold), and `TrialRecord.of` reads them back, for the
schedule, the sampler, liveness, results, report, export, retrain and cross-validation; no
one reads a trial's `values` by position: `record.quantity(name)` is an objective's value
whatever the study's objectives are. Studies written before a field existed read it as None
(or empty). Every attr is checked on read against what it must hold (nas/search/attr_schema.py;
the data settings through DataConfig, a trial's configs through UNetConfig and TrainConfig
where they are used: `record.candidate()`), so that a storage edited by hand or by another
program is one line naming the trial or study and the attr, not a traceback far from it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.core.errors import NasError
from nas.core.secrets import scrub_value
from nas.network.unet_config import UNetConfig
from nas.search.attr_schema import (
    HEARTBEAT_ATTR,
    LATENCY_IQR_ATTR,
    REJECTED_ATTR,
    STUDY_ATTRS,
    TRIAL_ATTRS,
    check_attrs,
    read_config,
)
from nas.search.candidate import Candidate
from nas.search.objectives import (
    DEFAULT_OBJECTIVES,
    OBJECTIVES,
    QUANTITY_ATTRS,
    Objective,
    score_of,
)
from nas.training.train_config import TrainConfig


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: TrialState
    params: Mapping[str, Any]
    quantities: Mapping[str, float | None]  # by objective name; None: not measured
    unet_config: Mapping[str, Any]
    train_config: Mapping[str, Any]
    curve: Mapping[int, float]  # validation IoU (or case Dice: curve_metric) by epoch
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
    # Multi-fidelity lineage (nas/search/schedule/fidelity.py, nas/search/schedule/policy.py):
    # the trial the candidate started in (None: this one; `lineage_root`), the epoch a
    # continuation trains until, the rungs it was scheduled on, and what its own segment of
    # training spent.
    lineage: int | None = None
    until: int | None = None
    rungs: tuple[int, ...] = ()
    stopped_by_time: bool = False
    steps: int = 0
    segment_seconds: float = 0.0
    # Who ran it (host:pid, nas/search/liveness.py), and the trial a rerun repeats.
    worker: str | None = None
    heartbeat_at: float | None = None  # journal and grpc storages: seconds since the epoch
    retry_of: int | None = None
    warm_start: bool = False  # enqueued from the space's warm_start list
    # Training history, across the lineage's segments, and the last validation per class.
    train_loss: tuple[float, ...] = ()
    epoch_seconds: tuple[float, ...] = ()
    val_iou_per_class: tuple[float, ...] = ()
    # Voxel counts per validation case of its last validations, by epoch (as text):
    # [case][intersection, predicted, truth][class], for the score's bootstrap interval.
    val_case_counts: Mapping[str, Any] = field(default_factory=dict)
    artifact_error: str | None = None  # the overlay or an upload failed (the scores stand)
    # A rerun of a search trial (nas.retrain, a fold of nas.evaluation.crossval): which, on
    # which fold, its search validation IoU, and each validation case scored out of fold.
    source_trial: int | None = None
    fold: int | None = None
    search_val_iou: float | None = None
    out_of_fold: tuple[Mapping[str, Any], ...] = ()
    class_names: tuple[str, ...] = ()
    # nas.retrain: the epoch of its best validation IoU and that epoch's iou and dice.
    best: Mapping[str, Any] = field(default_factory=dict)

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
        check_attrs(attrs, TRIAL_ATTRS, f"trial {trial.number}")
        quantities = {name: _number(attrs.get(attr)) for name, attr in QUANTITY_ATTRS.items()}
        return cls(
            number=trial.number,
            state=trial.state,
            params=trial.params,
            quantities=quantities,
            unet_config=attrs.get("unet_config") or {},
            train_config=attrs.get("train_config") or {},
            curve=trial.intermediate_values,
            epochs_run=attrs.get("epochs_run"),
            fidelity_steps=attrs.get("fidelity_steps"),
            continues=attrs.get("continues"),
            seconds=attrs.get("seconds"),
            device=attrs.get("device"),
            summary=attrs.get("summary") or "",
            fail_reason=attrs.get("fail_reason"),
            rejected=attrs.get(REJECTED_ATTR),
            violations=tuple(trial.constraints.values()),
            latency_iqr_ms=_number(attrs.get(LATENCY_IQR_ATTR)),
            completed_at=trial.datetime_complete,
            lineage=_integer(attrs.get("lineage")),
            until=_integer(attrs.get("until")),
            rungs=tuple(int(r) for r in attrs.get("rungs") or ()),
            stopped_by_time=bool(attrs.get("stopped_by_time")),
            steps=int(attrs.get("steps") or 0),
            segment_seconds=float(attrs.get("segment_seconds") or 0.0),
            worker=attrs.get("worker"),
            heartbeat_at=_number(attrs.get(HEARTBEAT_ATTR)),
            retry_of=_integer(attrs.get("retry_of")),
            warm_start=bool(attrs.get("warm_start")),
            train_loss=tuple(attrs.get("train_loss") or ()),
            epoch_seconds=tuple(attrs.get("epoch_seconds") or ()),
            val_iou_per_class=tuple(attrs.get("val_iou_per_class") or ()),
            val_case_counts=attrs.get("val_case_counts") or {},
            artifact_error=attrs.get("artifact_error"),
            source_trial=_integer(attrs.get("source_trial")),
            fold=_integer(attrs.get("fold")),
            search_val_iou=_number(attrs.get("search_val_iou")),
            out_of_fold=tuple(attrs.get("out_of_fold") or ()),
            class_names=tuple(attrs.get("class_names") or ()),
            best=attrs.get("best") or {},
        )

    def unet(self) -> UNetConfig:
        """The network it trained, read through UNetConfig's schema."""
        return read_config(
            UNetConfig.from_dict, self.unet_config, f"trial {self.number}", "unet_config"
        )

    def train(self) -> TrainConfig:
        """How it trained, read through TrainConfig's schema."""
        return read_config(
            lambda v: TrainConfig(**v), self.train_config, f"trial {self.number}", "train_config"
        )

    def candidate(self) -> Candidate:
        """The configs it trained with, each read through its schema."""
        return Candidate(self.unet(), self.train())

    @property
    def epochs(self) -> int | None:
        """The epochs its training was configured for."""
        return self.train_config.get("epochs")

    @classmethod
    def of_running(cls, trial: optuna.Trial) -> TrialRecord:
        """The record of a trial while it runs, as stored now."""
        return cls._read(trial.storage.get_trial(trial._trial_id))

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
    def lineage_root(self) -> int:
        """The trial its lineage started in: continuations share their first trial's."""
        return self.number if self.lineage is None else self.lineage

    @property
    def batches_per_epoch(self) -> int:
        return int(self.train_config.get("batches_per_epoch", 1))

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


# The fields of TrialRecord a trial stores under its own name, and those stored under another.
_DERIVED = {"number", "state", "params", "quantities", "curve", "violations", "completed_at"}
_RENAMED = {"rejected": REJECTED_ATTR, "heartbeat_at": HEARTBEAT_ATTR}


def attr_name(field: str) -> str:
    """The user attr under which a trial keeps `field`: a TrialRecord field, or a quantity
    (iou, params, ..., latency_iqr_ms)."""
    if field in QUANTITY_ATTRS:
        return QUANTITY_ATTRS[field]
    if field == LATENCY_IQR_ATTR:
        return field
    if field in _DERIVED or field not in TrialRecord.__dataclass_fields__:
        raise KeyError(f"a trial records no {field!r}")
    return _RENAMED.get(field, field)


def write(trial: optuna.Trial, **fields: Any) -> None:
    """Store `fields` (TrialRecord's names, or quantities) on a running trial; tuples are
    stored as lists, as Optuna keeps JSON; a storage password a text quotes is hidden."""
    for name, value in fields.items():
        trial.set_user_attr(attr_name(name), scrub_value(value))


def carried(**fields: Any) -> dict[str, Any]:
    """The user attrs a trial is enqueued with (`study.enqueue_trial(..., user_attrs=)`):
    `fields` by TrialRecord's names, those that are None left out."""
    return {attr_name(k): scrub_value(v) for k, v in fields.items() if v is not None}


def without_owner(trial: FrozenTrial) -> FrozenTrial:
    """A copy of `trial` whose attrs leave out who ran it (worker, heartbeat), for a rerun
    that copies them (Optuna's retry of a stale trial)."""
    owner = {attr_name("worker"), attr_name("heartbeat_at")}
    source = copy.deepcopy(trial)
    source.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in owner}
    return source


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _integer(value: Any) -> int | None:
    return None if value is None else int(value)


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
    names = StudyRecord.of(study).objectives or DEFAULT_OBJECTIVES
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise NasError(study.study_name, f"records unknown objective(s) {unknown}")
    return StudyObjectives(tuple(OBJECTIVES[n] for n in names))


@dataclass(frozen=True)
class StudyRecord:
    """What a study keeps about itself, by the same names as its user attrs. The search
    study: its objectives and constraints, what it is made of (space, data settings, the
    preprocessed data's description, the planned patch and batch sizes, its cases) and the
    held-out scores of its members. `<study>-crossval`: the postprocessing chosen per
    member, held-out fold ensembles and the ensembles across members. `<study>-retrain`: the
    all-cases models. Fields a study has not written are None (objectives, constraints,
    what it is made of) or empty; a study from before objectives were configurable has
    none: [iou, params], no constraints."""

    objectives: tuple[str, ...] | None = None
    constraints: Mapping[str, Any] | None = None
    space: Mapping[str, Any] | None = None
    data_config: Mapping[str, Any] | None = None
    data_description: Mapping[str, Any] | None = None
    # The `auto` sizes planned (nas/search/patch_plan.py).
    patch_plan: Mapping[str, Any] | None = None
    validation: Mapping[str, Any] | None = None  # how the search validated (scoring.py)
    data_cases: Mapping[str, Any] | None = None
    # Mappings by trial number: held-out scores (nas/evaluation/heldout.py), the classes
    # whose largest component is kept, held-out fold ensembles (rows of compare_ensemble),
    # the all-cases models ({epochs_run, ...}); and the ensembles across members ({"rows",
    # "chosen"}).
    test_scores: Mapping[str, Any] = field(default_factory=dict)
    postprocessing: Mapping[str, list[str]] = field(default_factory=dict)
    heldout_ensemble: Mapping[str, list] = field(default_factory=dict)
    all_cases: Mapping[str, Any] = field(default_factory=dict)
    member_ensembles: Mapping[str, Any] = field(default_factory=dict)
    # The front's whole validation volumes, predicted once per member after the search
    # ({iou, dice, seconds} by trial), beside the patch score the search decided on.
    volume_scores: Mapping[str, Any] = field(default_factory=dict)
    # How well each rung's ranking foretold the next one's, as the last run ended
    # (scoring.rung_correlations).
    rung_correlations: tuple[Mapping[str, Any], ...] = ()
    # The artifact store every host of the study reaches its trial files through
    # (nas/search/trial_files.py); None: each host's results folder, as on one machine.
    artifacts: str | None = None

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        return cls.from_attrs(study.user_attrs, f"study {study.study_name!r}")

    @classmethod
    def in_storage(cls, storage: optuna.storages.BaseStorage, study_id: int) -> StudyRecord:
        """The record of a study not yet opened (nas/search/study.py checks it first)."""
        name = storage.get_study_name_from_id(study_id)
        return cls.from_attrs(storage.get_study_user_attrs(study_id), f"study {name!r}")

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], source: str) -> StudyRecord:
        """The record of a study's `attrs`, each read through its schema (the data settings
        through DataConfig's); a NasError naming `source` and the attr where one is not."""
        check_attrs(attrs, STUDY_ATTRS, source)
        fields = {k: v for k, v in attrs.items() if k in cls.__dataclass_fields__ and v is not None}
        if "objectives" in fields:
            fields["objectives"] = tuple(fields["objectives"])
        if "rung_correlations" in fields:
            fields["rung_correlations"] = tuple(fields["rung_correlations"])
        if "data_config" in fields:
            from nas.data import DataConfig

            read_config(lambda v: DataConfig(**v), fields["data_config"], source, "data_config")
        return cls(**fields)

    def dataset(self) -> str:
        """The dataset's path as the search recorded it ("?" for a study without it)."""
        return (self.data_config or {}).get("path", "?")


def _study_field(name: str) -> str:
    if name not in StudyRecord.__dataclass_fields__:
        raise KeyError(f"a study records no {name!r}")
    return name


def write_study(study: optuna.Study, **fields: Any) -> None:
    """Store `fields` (StudyRecord's names) on `study`; tuples are stored as lists; a storage
    password a text quotes is hidden."""
    for name, value in fields.items():
        study.set_user_attr(_study_field(name), scrub_value(value))


def merge_study(study: optuna.Study, name: str, entries: Mapping[str, Any]) -> None:
    """Add `entries` ({trial: ...}) to a mapping a study keeps by trial, keeping the other
    trials' entries as stored now (another process may have added some)."""
    stored = getattr(StudyRecord.of(study), _study_field(name))
    write_study(study, **{name: {**stored, **entries}})
