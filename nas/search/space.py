"""The search space: the schema of its YAML file's four sections, and what it can draw.

- data:   where the data is (`nas.data.DataConfig`); default: the embedded synthetic dataset.
- search: builder parameters (`nas.network.builder.UNetConfig` fields), each a fixed value or a spec
          {type: int|float|categorical, low/high/step/log or choices, when, default, per_stage}.
- train:  training settings (`nas.training.fit.TrainConfig` fields), fixed values or specs alike.
- study:  name, sampler, n_trials, timeout, budget, seed, objectives, constraints, ...

A spec with `when: {param: value-or-list}` is sampled only when the named, earlier parameter
took one of those values; otherwise the field keeps its `default` (or the config's default).
`per_stage: true` samples one value per stage (kernel_size, skips). A field may also take a
list of specs, each with its own `when` (e.g. smaller kernels for 3D). A patch size is searched
as categorical choices of lists ([96, 96]), which Optuna records as "96x96". The file is read
and checked by nas/search/space_file.py (its fields by nas/search/space_spec.py) and drawn
from by nas/search/draw.py; YAML itself is parsed only by nas/core/yaml_file.py, for this
file, `--set` and an export's architecture.yaml alike.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nas.data import DataConfig
from nas.network.unet_config import UNetConfig
from nas.search.objectives import DEFAULT_OBJECTIVES, OBJECTIVES, Bound, LatencyConfig
from nas.search.objectives import Name as ObjectiveName
from nas.search.schedule.pruner import PrunerConfig
from nas.search.schedule.rungs import FidelityConfig
from nas.search.scoring import ValidationConfig
from nas.search.space_spec import CategoricalSpec, IntSpec, is_searched
from nas.search.storage import HeartbeatConfig

# A study name is a folder name under results/: letters, digits, _ . -, not starting with a
# dot (so never "." or ".."), never a path.
STUDY_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$"


class StudySection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field("unet", pattern=STUDY_NAME_PATTERN)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    population_size: int | None = Field(None, ge=2)  # NSGA-II generation size
    startup_trials: int = Field(10, ge=1)  # TPE: random candidates before it models them
    n_trials: int = Field(10, ge=1)  # new candidates in the study, counting earlier runs
    timeout: float | None = Field(None, gt=0)  # seconds for this run
    # Total optimiser steps the study may train, over all candidates and rungs (None: no
    # limit but n_trials and the timeout, from which the search plans its steps itself).
    budget: int | None = Field(None, ge=1)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)
    # Trial seeds are this plus the trial's number, and numpy takes seeds below 2**32.
    seed: int = Field(0, ge=0, lt=2**31)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    # What validation costs while searching: fixed patches per case, after which epochs.
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    # Architectures (builder and training fields) that run first in a new study.
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    # How a trial whose worker died is noticed (FAIL after grace_period) and retried.
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    # A candidate estimated to need more memory than this to train fails before it is built
    # (default: half the machine's RAM, or 90 % of the GPU's memory).
    max_memory_gb: float | None = Field(None, gt=0)
    # What the search optimises (2 or 3 of nas.search.objectives.OBJECTIVES, one a score) and the
    # bounds a candidate must respect; where latency is measured.
    objectives: list[ObjectiveName] = Field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    constraints: dict[ObjectiveName, Bound] = Field(default_factory=dict)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    # Where the trial files go so that every host finds them (a folder every host mounts,
    # or s3://BUCKET/PREFIX); recorded in the study. None: the results folder of each host.
    artifacts: str | None = Field(None, min_length=1)

    @field_validator("objectives")
    @classmethod
    def _check_objectives(cls, names: list[str]) -> list[str]:
        if not 2 <= len(names) <= 3:
            raise ValueError(f"give 2 or 3 objectives, not {len(names)}: {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"an objective is named twice: {names}")
        if not any(OBJECTIVES[n].maximise for n in names):
            raise ValueError(f"needs a score to maximise (iou, dice or case_dice) among {names}")
        return names


class SearchSpace(BaseModel):
    """A validated search space; `search` and `train` map a field to a spec or a fixed value."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    data: DataConfig = Field(default_factory=DataConfig)
    search: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    study: StudySection = Field(default_factory=StudySection)

    @field_validator("search", "train", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


def describe_space(space: SearchSpace) -> dict[str, Any]:
    """The searched and fixed builder and training fields as plain JSON, to compare the
    space a study was made with against the one a resume brings."""

    def plain(entry: Any) -> Any:
        if is_searched(entry):
            return [spec.model_dump(exclude_defaults=True) for spec in entry]
        return list(entry) if isinstance(entry, tuple) else entry

    return json.loads(
        json.dumps(
            {
                section: {name: plain(v) for name, v in getattr(space, section).items()}
                for section in ("search", "train")
            }  # fmt: skip
        )
    )


def possible_values(space: SearchSpace, field: str, spatial_dims: int | None = None) -> set[Any]:
    """Every value of a builder field the space can draw (for `spatial_dims`, if given: specs
    whose `when` excludes it are skipped)."""
    entry = space.search.get(field, getattr(UNetConfig(), field))
    if not is_searched(entry):
        return {entry}
    values: set[Any] = set()
    for spec in entry:
        allowed = (spec.when or {}).get("spatial_dims")
        allowed = allowed if isinstance(allowed, list) else [allowed]
        if spatial_dims is not None and None not in allowed and spatial_dims not in allowed:
            continue
        if isinstance(spec, IntSpec):
            values |= set(range(spec.low, spec.high + 1, spec.step))
        elif isinstance(spec, CategoricalSpec):
            values |= set(spec.choices)
    if any(spec.when for spec in entry):  # where no spec applies, the field keeps its default
        default = next((s.default for s in entry if s.default is not None), None)
        values.add(default if default is not None else getattr(UNetConfig(), field))
    return values
