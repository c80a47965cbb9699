"""Read and validate a search-space YAML file, and sample candidates from it.

The only module that reads YAML. A file has four sections:

- data:   where the data is (`nas.data.DataConfig`); default: the embedded synthetic dataset.
- search: builder parameters (`nas.network.builder.UNetConfig` fields), each a fixed value or a spec
          {type: int|float|categorical, low/high/step/log or choices, when, default, per_stage}.
- train:  training settings (`nas.training.fit.TrainConfig` fields), fixed values or specs alike.
- study:  name, sampler, n_trials, timeout, budget, seed, objectives, constraints, ...

A spec with `when: {param: value-or-list}` is sampled only when the named, earlier parameter
took one of those values; otherwise the field keeps its `default` (or the config's default).
`per_stage: true` samples one value per stage (kernel_size, skips). A field may also take a
list of specs, each with its own `when` (e.g. smaller kernels for 3D). A patch size is searched
as categorical choices of lists ([96, 96]), which Optuna records as "96x96". Every mistake
becomes a `NasError` naming the file and the key path, before anything trains.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from nas.core.errors import NasError
from nas.core.yaml_file import MAX_DEPTH, parse_yaml, read_yaml
from nas.data import DataConfig
from nas.network.unet_config import PER_STAGE_FIELDS, UNetConfig, per_stage_length
from nas.search.candidate import Candidate
from nas.search.objectives import DEFAULT_OBJECTIVES, OBJECTIVES, Bound, LatencyConfig
from nas.search.objectives import Name as ObjectiveName
from nas.search.schedule.fidelity import FidelityConfig
from nas.search.schedule.pruning import PrunerConfig
from nas.search.scoring import ValidationConfig
from nas.search.storage import HeartbeatConfig
from nas.training.train_config import MAX_PATCH_SIZE, TrainConfig

Scalar = bool | int | float | str | None
# Filled from the data, never searched.
DATA_DEFINED_FIELDS = ("in_channels", "out_channels")
# Training sizes a space may leave to `auto`: nas.search.patch_plan plans them from the dataset and
# the device before the study opens (sample() refuses a space still holding it).
AUTO = "auto"
PLANNED_FIELDS = ("batch_size_2d", "patch_size_2d", "batch_size_3d", "patch_size_3d")
# The training fields that hold a patch, by its number of axes: the only fields (both tuples
# in TrainConfig) whose categorical choices may be lists.
PATCH_FIELDS = {"patch_size_2d": 2, "patch_size_3d": 3}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    when: dict[str, Scalar | list[Scalar]] | None = None
    default: Any = None
    per_stage: bool = False


class IntSpec(_Spec):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> IntSpec:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is greater than high ({self.high})")
        if self.log and (self.step != 1 or self.low < 1):
            raise ValueError("log needs step 1 and low >= 1")
        return self


class FloatSpec(_Spec):
    type: Literal["float"]
    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> FloatSpec:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is greater than high ({self.high})")
        if self.log and (self.step is not None or self.low <= 0):
            raise ValueError("log needs no step and low > 0")
        return self


class CategoricalSpec(_Spec):
    """Choices are scalars, or for a field that holds a fixed-length tuple (a patch size)
    lists such as [96, 96], which Optuna sees as the string "96x96" (`_optuna_choice`)."""

    type: Literal["categorical"]
    choices: list[Scalar | tuple[Scalar, ...]] = Field(min_length=1)


ParamSpec = Annotated[IntSpec | FloatSpec | CategoricalSpec, Field(discriminator="type")]
_PARAM_SPEC = TypeAdapter(ParamSpec)


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


def _fields(config_type: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_type)]


def _number_type(config_type: type, field: str) -> type | None:
    """int or float where `field` holds a number (or None), else None."""
    annotation = config_type.__pydantic_fields__[field].annotation
    members = set(getattr(annotation, "__args__", ())) - {type(None)} or {annotation}
    return next((t for t in (int, float) if members == {t}), None)


def _check_number(where: str, number_type: type | None, value: Any) -> None:
    """What pydantic's lax mode would let through: a YAML boolean (yes, no, true) or a
    fraction for a whole number, NaN or infinity."""
    if number_type is None:
        return
    if isinstance(value, bool):
        raise _SpaceError(where, f"invalid value {value!r}: a boolean (yes/no/true/false), "
                          "not a number")  # fmt: skip
    if isinstance(value, float) and not math.isfinite(value):
        raise _SpaceError(where, f"invalid value {value!r}: give a finite number")
    if number_type is int and isinstance(value, float):
        raise _SpaceError(where, f"invalid value {value!r}: give a whole number")


def _field_adapter(config_type: type, field: str) -> TypeAdapter:
    """Validates one value of `field`, bounds included (Field(ge=0, le=1) and the like), so a
    spec's low, high or choices outside them is refused before any trial draws them."""
    info = config_type.__pydantic_fields__[field]
    if not info.metadata:
        return TypeAdapter(info.annotation)
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])


def _parse_entries(
    section: str, entries: dict[str, Any], config_type: type, known: list[str]
) -> dict[str, Any]:
    """Validate one section's entries into specs or fixed values; `known` collects names."""
    allowed = [f for f in _fields(config_type) if f not in DATA_DEFINED_FIELDS and f != "seed"]
    parsed: dict[str, Any] = {}
    for name, raw in entries.items():
        where = f"{section}.{name}"
        if name not in allowed:
            raise _SpaceError(where, f"unknown parameter; expected one of {', '.join(allowed)}")
        adapter = _field_adapter(config_type, name)
        number = _number_type(config_type, name)
        if _is_spec(raw):
            parsed[name] = (_parse_spec(where, name, raw, adapter, known, number),)
        elif isinstance(raw, list) and raw and all(_is_spec(item) for item in raw):
            variants = tuple(
                _parse_spec(f"{where}[{i}]", name, item, adapter, known, number)
                for i, item in enumerate(raw)
            )
            for i, variant in enumerate(variants):
                if variant.when is None:
                    raise _SpaceError(
                        f"{where}[{i}]", "each of several specs for one parameter needs a when"
                    )
            parsed[name] = variants
        elif name in PLANNED_FIELDS and isinstance(raw, str):
            if raw != AUTO:
                raise _SpaceError(
                    where, f"invalid value {raw!r}: give the size, or auto to plan it from the data"
                )
            parsed[name] = AUTO
        else:
            _check_number(where, number, raw)
            parsed[name] = _check_value(where, adapter, raw)
        known.append(name)
    return parsed


def _is_spec(raw: Any) -> bool:
    return isinstance(raw, dict) and "type" in raw


def _is_searched(entry: Any) -> bool:
    """A parsed entry to sample: a tuple of specs (several only when each has a `when`)."""
    return isinstance(entry, tuple) and bool(entry) and isinstance(entry[0], _Spec)


def _parse_spec(
    where: str,
    name: str,
    raw: dict,
    adapter: TypeAdapter,
    known: list[str],
    number: type | None = None,
) -> _Spec:
    for key in ("low", "high", "step"):  # before pydantic turns true into 1
        if key in raw and not isinstance(raw[key], str):
            _check_number(f"{where}.{key}", float, raw[key])
    try:
        spec = _PARAM_SPEC.validate_python(raw)
    except ValidationError as err:
        raise _SpaceError.from_validation(where, err) from None
    if isinstance(spec, FloatSpec) and number is int:
        raise _SpaceError(
            where, f"{name} is a whole number: use {{type: int, ...}} or categorical choices"
        )
    if isinstance(spec, IntSpec) and any(isinstance(raw.get(k), float) for k in ("low", "high")):
        raise _SpaceError(where, "an int spec takes whole numbers for low and high")
    if spec.per_stage and name not in PER_STAGE_FIELDS:
        raise _SpaceError(
            f"{where}.per_stage", f"only {', '.join(PER_STAGE_FIELDS)} can take one value per stage"
        )
    if isinstance(spec, CategoricalSpec):
        _check_list_choices(where, name, spec.choices)
    values = spec.choices if isinstance(spec, CategoricalSpec) else [spec.low, spec.high]
    for value in values + ([spec.default] if spec.default is not None else []):
        if not isinstance(spec, FloatSpec):  # a float range over a float field is what it is
            _check_number(where, number, value)
        _check_value(where, adapter, value)
    for other in spec.when or {}:
        if other not in known:
            raise _SpaceError(
                f"{where}.when.{other}",
                "names no parameter declared before this one in search or train",
            )
    return spec


def _check_list_choices(where: str, name: str, choices: Sequence[Any]) -> None:
    """A list choice only for a patch field, and there each choice a list of as many whole
    numbers as the patch has axes, within the largest patch a TrainConfig admits."""
    axes = PATCH_FIELDS.get(name)
    for i, choice in enumerate(choices):
        at = f"{where}.choices[{i}]"
        if axes is None:
            if isinstance(choice, tuple):
                raise _SpaceError(
                    at, f"{list(choice)} is a list: only {', '.join(PATCH_FIELDS)} take lists"
                )
            continue
        shown = list(choice) if isinstance(choice, tuple) else choice
        if not (
            isinstance(choice, tuple)
            and len(choice) == axes
            and all(type(size) is int for size in choice)
        ):
            raise _SpaceError(
                at,
                f"{shown!r} is not a {axes}D patch: give {axes} whole numbers, e.g. {[96] * axes}",
            )
        limit = MAX_PATCH_SIZE[axes]
        if not all(1 <= size <= limit for size in choice):
            raise _SpaceError(at, f"{shown} must be between 1 and {limit} per axis")


def _check_value(where: str, adapter: TypeAdapter, value: Any) -> Any:
    try:
        return adapter.validate_python(tuple(value) if isinstance(value, list) else value)
    except ValidationError as err:
        raise _SpaceError(where, f"invalid value {value!r}: {_first_message(err)}") from None


def _first_message(err: ValidationError) -> str:
    return err.errors()[0]["msg"]


class _SpaceError(Exception):
    """A mistake at a key path, turned into a NasError with the file name by `load_space`."""

    def __init__(self, where: str, reason: str) -> None:
        self.where, self.reason = where, reason

    @classmethod
    def from_validation(cls, prefix: str, err: ValidationError) -> _SpaceError:
        first = err.errors()[0]
        # Drop pydantic's union-member tags (e.g. "int") from the location.
        loc = [str(p) for p in first["loc"] if str(p) not in ("int", "float", "categorical")]
        where = ".".join([prefix, *loc]) if prefix else ".".join(loc)
        reason = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            reason = "unknown key"
        naming = loc[:2] in (["study", "objectives"], ["study", "constraints"])
        if not prefix and naming and first["type"] == "literal_error":
            reason = f"unknown objective {first['input']!r} (known: {', '.join(OBJECTIVES)})"
            where = ".".join(loc[:3])  # without pydantic's "[key]" after a constraint's name
        return cls(where or "(top level)", reason)


def apply_settings(raw: dict[str, Any], settings: Sequence[str]) -> dict[str, Any]:
    """`raw` with each `key.path=value` of `settings` set (values read as YAML, so numbers,
    lists and `{type: int, low: 2, high: 5}` work); a malformed one is a NasError."""
    raw = copy.deepcopy(raw)
    for setting in settings:
        key, sep, text = setting.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            shown = setting if len(setting) <= 80 else setting[:77] + "..."
            raise NasError("--set", f"{shown!r} is not key.path=value (e.g. train.epochs=3)")
        if len(parts) > MAX_DEPTH:
            raise NasError("--set", f"{key[:60]}...: a key path of {len(parts)} parts; a space "
                           f"is at most {MAX_DEPTH} deep")  # fmt: skip
        value = parse_yaml(text, f"--set {key}")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise NasError("--set", f"{key}: {part} holds a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_effective_space(
    path: str | Path, settings: Sequence[str] = (), data: str | Path | None = None
) -> dict[str, Any]:
    """The YAML of `path` with `--set` settings and a `--data` folder applied, unvalidated."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise NasError(path, "must be a mapping with sections data, search, train, study")
    if data is not None:  # a dataset of the user's own: the embedded one is not generated
        section = dict(raw.get("data") or {})
        section.pop("synthetic", None)
        raw["data"] = {**section, "path": str(data)}
    return apply_settings(raw, settings)


def load_space(
    path: str | Path, settings: Sequence[str] = (), data: str | Path | None = None
) -> SearchSpace:
    """Read and validate `path` with `--set` settings and a `--data` folder applied; any
    problem raises NasError naming the file (or --set) and the key."""
    path = Path(path)
    raw = read_effective_space(path, settings, data)
    return validate_space(raw, path, settings)


def validate_space(raw: dict[str, Any], path: Path, settings: Sequence[str] = ()) -> SearchSpace:
    try:
        return _validate(raw)
    except _SpaceError as err:
        raise NasError(source_of(err.where, path, settings), f"{err.where}: {err.reason}") from None


def source_of(key: str, path: Path, settings: Sequence[str]) -> str | Path:
    """Where the value at `key` (a.b.c) came from: "--set" when a setting set it, a section
    above it, or (for a check of a whole section, such as data's fold against n_folds) a key
    inside it; else the space file."""
    set_keys = [s.partition("=")[0].strip() for s in settings]
    touched = any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in set_keys)
    return "--set" if touched else path


def _validate(raw: dict[str, Any]) -> SearchSpace:
    try:
        space = SearchSpace.model_validate(raw)
        known: list[str] = []
        search = _parse_entries("search", space.search, UNetConfig, known)
        train = _parse_entries("train", space.train, TrainConfig, known)
        space = space.model_copy(update={"search": search, "train": train})
        _check_defaults_build(space)
        _check_patches_span_stride(space)
        _check_validation_every(space)
        for i, entry in enumerate(space.study.enqueue):
            try:
                warm_start_params(space, entry)
            except ValueError as err:
                raise _SpaceError(f"study.enqueue[{i}]", str(err)) from None
    except ValidationError as err:
        raise _SpaceError.from_validation("", err) from None
    return space


def with_study_overrides(space: SearchSpace, overrides: dict[str, Any]) -> SearchSpace:
    """`space` with command-line values for study fields (None: keep the file's), validated
    by the same schema as the file; a bad value is a NasError naming the option."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        study = StudySection.model_validate(space.study.model_dump() | given)
    except ValidationError as err:
        first = err.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "study"
        if option == "--name":
            option = "--study-name"
        reason = first["msg"]
        if first["type"] == "string_pattern_mismatch":
            reason = "must be letters, digits, _ . - (not starting with a dot), not a path"
        raise NasError(option, f"invalid value {given.get(first['loc'][0])!r}: {reason}") from None
    return space.model_copy(update={"study": study})


def describe_space(space: SearchSpace) -> dict[str, Any]:
    """The searched and fixed builder and training fields as plain JSON, to compare the
    space a study was made with against the one a resume brings."""

    def plain(entry: Any) -> Any:
        if _is_searched(entry):
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


_PARAM_NAME = re.compile(r"^(?P<field>.+?)(?:#(?P<variant>\d+))?(?:_(?P<stage>\d+))?$")


def param_distribution(
    space: SearchSpace, param: str
) -> optuna.distributions.BaseDistribution | None:
    """The Optuna distribution `sample` would draw the parameter named `param` from, or None
    if this space draws no such parameter."""
    match = _PARAM_NAME.match(param)
    entry = None
    if match:
        entry = space.search.get(match["field"], space.train.get(match["field"]))
    if not _is_searched(entry):
        return None
    variant = int(match["variant"]) - 1 if match["variant"] else 0
    if (match["variant"] is None) != (len(entry) == 1) or not 0 <= variant < len(entry):
        return None
    spec = entry[variant]
    if spec.per_stage != (match["stage"] is not None):
        return None
    if isinstance(spec, IntSpec):
        return optuna.distributions.IntDistribution(spec.low, spec.high, log=spec.log,
                                                    step=spec.step)  # fmt: skip
    if isinstance(spec, FloatSpec):
        return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log,
                                                      step=spec.step)  # fmt: skip
    return optuna.distributions.CategoricalDistribution(_optuna_choices(spec))


def _optuna_choice(value: Any) -> Scalar:
    """A categorical choice as Optuna stores it. Optuna's CategoricalDistribution takes only
    None, bool, int, float and str, so a patch (96, 96) is stored as "96x96", which is also
    how optuna-dashboard and trials.csv show it; any other value is itself."""
    if isinstance(value, tuple | list):
        return "x".join(str(size) for size in value)
    return value


def _optuna_choices(spec: CategoricalSpec) -> list[Scalar]:
    return [_optuna_choice(choice) for choice in spec.choices]


def _from_optuna(spec: CategoricalSpec, drawn: Scalar) -> Any:
    """The choice of `spec` that Optuna stored as `drawn`: a patch back as its tuple."""
    patches = {_optuna_choice(c): c for c in spec.choices if isinstance(c, tuple)}
    return patches.get(drawn, drawn)


def _check_defaults_build(space: SearchSpace) -> None:
    """The fixed values together must make a valid config (e.g. depth vs per-stage lists)."""
    for section, config_type in (("search", UNetConfig), ("train", TrainConfig)):
        fixed = {
            k: v for k, v in getattr(space, section).items() if not _is_searched(v) and v != AUTO
        }
        try:
            config_type(**fixed)
        except ValidationError as err:
            loc = err.errors()[0]["loc"]
            # A bound on one field (epochs >= 1) names it; a rule across fields the section.
            where = f"{section}.{loc[0]}" if loc and loc[0] in fixed else section
            raise _SpaceError(where, _first_message(err).removeprefix("Value error, ")) from None


def _check_validation_every(space: SearchSpace) -> None:
    """A validation every N epochs needs N within the training's epochs."""
    every = space.study.validation.every
    epochs = space.train.get("epochs", TrainConfig.__pydantic_fields__["epochs"].default)
    top = epochs
    if not isinstance(epochs, int):  # searched: the most any candidate trains
        top = max(max(s.choices) if isinstance(s, CategoricalSpec) else s.high for s in epochs)
    if every is not None and every > top:
        raise _SpaceError(
            "study.validation.every", f"is {every}, more than the {top} epochs candidates train"
        )


def _check_patches_span_stride(space: SearchSpace) -> None:
    """Every patch the space gives (fixed, or each choice) spans on every axis the total
    stride of the deepest network of its kind that the space draws. The network would pad a
    smaller patch to its stride, so its deepest stages would see mostly padding: compute
    spent on zeros, and a candidate scored on a patch it never really saw."""
    drawn_dims = possible_values(space, "spatial_dims")
    for field, spatial_dims in PATCH_FIELDS.items():
        entry = space.train.get(field, AUTO)
        if spatial_dims not in drawn_dims or entry == AUTO:
            continue
        depth = max(possible_values(space, "depth", spatial_dims))
        stride = _deepest_stride(space, spatial_dims, depth)
        for where, patch in _given_patches(f"train.{field}", entry):
            if any(size < axis_stride for size, axis_stride in zip(patch, stride, strict=True)):
                raise _SpaceError(
                    where,
                    f"{list(patch)} is smaller than {list(stride)}, the total stride of the "
                    f"deepest {spatial_dims}D network this space draws (depth {depth}); give "
                    "a larger patch or a smaller depth",
                )


def _deepest_stride(space: SearchSpace, spatial_dims: int, depth: int) -> tuple[int, ...]:
    """The largest total stride per axis of a network of `depth` stages the space draws:
    2**(depth - 1), less the anisotropic stages that keep a 3D network's last axis."""
    stride = 2 ** (depth - 1)
    if spatial_dims == 2:
        return (stride, stride)
    kept = min(possible_values(space, "anisotropic_stages", 3))
    return (stride, stride, 2 ** max(depth - 1 - kept, 0))


def _given_patches(where: str, entry: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Each patch a fixed or searched entry can give, with its key path."""
    if not _is_searched(entry):
        return [(where, entry)]
    patches = []
    for i, spec in enumerate(entry):
        at = where if len(entry) == 1 else f"{where}[{i}]"
        patches += [(f"{at}.choices[{j}]", choice) for j, choice in enumerate(spec.choices)]
        if spec.default is not None:
            patches.append((f"{at}.default", tuple(spec.default)))
    return patches


def possible_values(space: SearchSpace, field: str, spatial_dims: int | None = None) -> set[Any]:
    """Every value of a builder field the space can draw (for `spatial_dims`, if given: specs
    whose `when` excludes it are skipped)."""
    entry = space.search.get(field, getattr(UNetConfig(), field))
    if not _is_searched(entry):
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


def _condition_holds(when: dict[str, Any] | None, values: dict[str, Any]) -> bool:
    for name, expected in (when or {}).items():
        allowed = expected if isinstance(expected, list) else [expected]
        if values.get(name) not in allowed:
            return False
    return True


# Draws one value: suggest(optuna_param_name, field, stage_index_or_None, spec).
Suggest = Callable[[str, str, "int | None", _Spec], Any]
_UNSET = object()  # a warm-start entry that leaves a parameter to the sampler


def _optuna_suggest(trial: optuna.Trial) -> Suggest:
    def suggest(param: str, field: str, stage: int | None, spec: _Spec) -> Any:
        if isinstance(spec, IntSpec):
            return trial.suggest_int(param, spec.low, spec.high, step=spec.step, log=spec.log)
        if isinstance(spec, FloatSpec):
            return trial.suggest_float(param, spec.low, spec.high, step=spec.step, log=spec.log)
        return _from_optuna(spec, trial.suggest_categorical(param, _optuna_choices(spec)))

    return suggest


def _sample_section(entries: dict[str, Any], suggest: Suggest, values: dict[str, Any]) -> dict:
    """Sample one section in file order; `values` holds every parameter chosen so far."""
    chosen: dict[str, Any] = {}
    for name, entry in entries.items():
        if not _is_searched(entry):
            chosen[name] = entry
        else:
            active = [(i, v) for i, v in enumerate(entry) if _condition_holds(v.when, values)]
            if active:
                i, spec = active[0]
                # Each of several specs gets its own parameter name: Optuna keeps one
                # distribution per name.
                param = name if len(entry) == 1 else f"{name}#{i + 1}"
                if spec.per_stage:
                    count = per_stage_length(name, chosen.get("depth", UNetConfig().depth))
                    drawn = tuple(suggest(f"{param}_{j}", name, j, spec) for j in range(count))
                    value = _UNSET if _UNSET in drawn else drawn
                else:
                    value = suggest(param, name, None, spec)
                if value is not _UNSET:
                    chosen[name] = value
            else:
                default = next((v.default for v in entry if v.default is not None), None)
                if default is not None:
                    chosen[name] = default
        if name in chosen:
            values[name] = chosen[name]
    return chosen


def warm_start_params(space: SearchSpace, fields: dict[str, Any]) -> dict[str, Any]:
    """Optuna parameter values that make `sample` draw the given builder/training fields.

    Fields not given (or not active under the given ones) are left to the sampler. A value
    outside its spec's range or choices is refused.
    """
    params: dict[str, Any] = {}

    def record(param: str, field: str, stage: int | None, spec: _Spec) -> Any:
        if field not in fields:
            return _UNSET
        value = fields[field]
        if stage is not None and isinstance(value, list | tuple):
            value = value[stage] if stage < len(value) else _UNSET
        if value is not _UNSET:
            if isinstance(value, list):  # a patch, as YAML gives it
                value = tuple(value)
            if not _in_spec(value, spec):
                shown = list(value) if isinstance(value, tuple) else value
                raise ValueError(f"{field}: {shown!r} is outside the search space of {param}")
            params[param] = _optuna_choice(value)
        return value

    unknown = sorted(set(fields) - set(space.search) - set(space.train))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not searched or set in this space")
    values: dict[str, Any] = {}
    _sample_section(space.search, record, values)
    _sample_section(space.train, record, values)
    return params


def _in_spec(value: Any, spec: _Spec) -> bool:
    if isinstance(spec, CategoricalSpec):
        return value in spec.choices
    return isinstance(value, int | float) and spec.low <= value <= spec.high


def sample(
    space: SearchSpace, trial: optuna.Trial, in_channels: int, out_channels: int, seed: int
) -> Candidate:
    """Draw one candidate; data-defined channel counts and the trial's seed are filled in."""
    values: dict[str, Any] = {}
    suggest = _optuna_suggest(trial)
    unet = _sample_section(space.search, suggest, values)
    train = _sample_section(space.train, suggest, values)
    unet_config = UNetConfig.from_dict(
        {**unet, "in_channels": in_channels, "out_channels": out_channels}
    )
    return Candidate(unet_config, TrainConfig(**train, seed=seed))
