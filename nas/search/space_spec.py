"""One section of a search space (`search` or `train`) read field by field: each a fixed value
or a spec to sample, checked against the config field it sets.

A spec is {type: int|float|categorical, low/high/step/log or choices, when, default,
per_stage}. Every value a spec can give (its range, choices and default) is validated with the
field's own bounds, a YAML boolean or a fraction where a whole number belongs is refused, and a
`when` may name only a parameter declared before it, so a mistake is found before any trial
draws it. A mistake is a `SpaceError` at its key path, which nas/search/space_file.py turns
into a NasError naming the file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from nas.network.unet_config import PER_STAGE_FIELDS
from nas.search.objectives import OBJECTIVES
from nas.training.train_config import MAX_PATCH_SIZE

Scalar = bool | int | float | str | None
# Filled from the data, never searched.
DATA_DEFINED_FIELDS = ("in_channels", "out_channels")
# Training sizes a space may leave to `auto`: nas.search.patch_plan plans them from the dataset
# and the device before the study opens (sample() refuses a space still holding it).
AUTO = "auto"
PLANNED_FIELDS = ("batch_size_2d", "patch_size_2d", "batch_size_3d", "patch_size_3d")
# The training fields that hold a patch, by its number of axes: the only fields (both tuples
# in TrainConfig) whose categorical choices may be lists.
PATCH_FIELDS = {"patch_size_2d": 2, "patch_size_3d": 3}


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    when: dict[str, Scalar | list[Scalar]] | None = None
    default: Any = None
    per_stage: bool = False


class IntSpec(Spec):
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


class FloatSpec(Spec):
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


class CategoricalSpec(Spec):
    """Choices are scalars, or for a field that holds a fixed-length tuple (a patch size)
    lists such as [96, 96], which Optuna sees as the string "96x96" (nas/search/draw.py)."""

    type: Literal["categorical"]
    choices: list[Scalar | tuple[Scalar, ...]] = Field(min_length=1)


ParamSpec = Annotated[IntSpec | FloatSpec | CategoricalSpec, Field(discriminator="type")]
_PARAM_SPEC = TypeAdapter(ParamSpec)


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
        raise SpaceError(where, f"invalid value {value!r}: a boolean (yes/no/true/false), "
                          "not a number")  # fmt: skip
    if isinstance(value, float) and not math.isfinite(value):
        raise SpaceError(where, f"invalid value {value!r}: give a finite number")
    if number_type is int and isinstance(value, float):
        raise SpaceError(where, f"invalid value {value!r}: give a whole number")


def _field_adapter(config_type: type, field: str) -> TypeAdapter:
    """Validates one value of `field`, bounds included (Field(ge=0, le=1) and the like), so a
    spec's low, high or choices outside them is refused before any trial draws them."""
    info = config_type.__pydantic_fields__[field]
    if not info.metadata:
        return TypeAdapter(info.annotation)
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])


def parse_entries(
    section: str, entries: dict[str, Any], config_type: type, known: list[str]
) -> dict[str, Any]:
    """Validate one section's entries into specs or fixed values; `known` collects names."""
    allowed = [f for f in _fields(config_type) if f not in DATA_DEFINED_FIELDS and f != "seed"]
    parsed: dict[str, Any] = {}
    for name, raw in entries.items():
        where = f"{section}.{name}"
        if name not in allowed:
            raise SpaceError(where, f"unknown parameter; expected one of {', '.join(allowed)}")
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
                    raise SpaceError(
                        f"{where}[{i}]", "each of several specs for one parameter needs a when"
                    )
            parsed[name] = variants
        elif name in PLANNED_FIELDS and isinstance(raw, str):
            if raw != AUTO:
                raise SpaceError(
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


def is_searched(entry: Any) -> bool:
    """A parsed entry to sample: a tuple of specs (several only when each has a `when`)."""
    return isinstance(entry, tuple) and bool(entry) and isinstance(entry[0], Spec)


def _parse_spec(
    where: str,
    name: str,
    raw: dict,
    adapter: TypeAdapter,
    known: list[str],
    number: type | None = None,
) -> Spec:
    for key in ("low", "high", "step"):  # before pydantic turns true into 1
        if key in raw and not isinstance(raw[key], str):
            _check_number(f"{where}.{key}", float, raw[key])
    try:
        spec = _PARAM_SPEC.validate_python(raw)
    except ValidationError as err:
        raise SpaceError.from_validation(where, err) from None
    if isinstance(spec, FloatSpec) and number is int:
        raise SpaceError(
            where, f"{name} is a whole number: use {{type: int, ...}} or categorical choices"
        )
    if isinstance(spec, IntSpec) and any(isinstance(raw.get(k), float) for k in ("low", "high")):
        raise SpaceError(where, "an int spec takes whole numbers for low and high")
    if spec.per_stage and name not in PER_STAGE_FIELDS:
        raise SpaceError(
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
            raise SpaceError(
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
                raise SpaceError(
                    at, f"{list(choice)} is a list: only {', '.join(PATCH_FIELDS)} take lists"
                )
            continue
        shown = list(choice) if isinstance(choice, tuple) else choice
        if not (
            isinstance(choice, tuple)
            and len(choice) == axes
            and all(type(size) is int for size in choice)
        ):
            raise SpaceError(
                at,
                f"{shown!r} is not a {axes}D patch: give {axes} whole numbers, e.g. {[96] * axes}",
            )
        limit = MAX_PATCH_SIZE[axes]
        if not all(1 <= size <= limit for size in choice):
            raise SpaceError(at, f"{shown} must be between 1 and {limit} per axis")


def _check_value(where: str, adapter: TypeAdapter, value: Any) -> Any:
    try:
        return adapter.validate_python(tuple(value) if isinstance(value, list) else value)
    except ValidationError as err:
        raise SpaceError(where, f"invalid value {value!r}: {first_message(err)}") from None


def first_message(err: ValidationError) -> str:
    return err.errors()[0]["msg"]


class SpaceError(Exception):
    """A mistake at a key path, turned into a NasError with the file name by `load_space`."""

    def __init__(self, where: str, reason: str) -> None:
        self.where, self.reason = where, reason

    @classmethod
    def from_validation(cls, prefix: str, err: ValidationError) -> SpaceError:
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
