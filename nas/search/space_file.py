"""Read a search-space file into a validated `SearchSpace`: the YAML (through
nas/core/yaml_file.py), `--set key.path=value` settings and a `--data` folder applied, each
section's fields parsed (nas/search/space_spec.py), then the rules across fields: the fixed
values build a config, every patch spans the deepest network's stride, validation falls
within the epochs, and each enqueued architecture lies in the space. Every mistake becomes a
`NasError` naming the file (or `--set`) and the key path, before anything trains; command-line
values for study fields go through the same schema.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nas.core.errors import NasError
from nas.core.yaml_file import MAX_DEPTH, parse_yaml, read_yaml
from nas.network.unet_config import UNetConfig
from nas.search.draw import warm_start_params
from nas.search.space import SearchSpace, StudySection, possible_values
from nas.search.space_spec import (
    AUTO,
    PATCH_FIELDS,
    CategoricalSpec,
    SpaceError,
    first_message,
    is_searched,
    parse_entries,
)
from nas.training.train_config import TrainConfig


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
    except SpaceError as err:
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
        search = parse_entries("search", space.search, UNetConfig, known)
        train = parse_entries("train", space.train, TrainConfig, known)
        space = space.model_copy(update={"search": search, "train": train})
        _check_defaults_build(space)
        _check_patches_span_stride(space)
        _check_validation_every(space)
        for i, entry in enumerate(space.study.enqueue):
            try:
                warm_start_params(space, entry)
            except ValueError as err:
                raise SpaceError(f"study.enqueue[{i}]", str(err)) from None
    except ValidationError as err:
        raise SpaceError.from_validation("", err) from None
    return space


def _check_defaults_build(space: SearchSpace) -> None:
    """The fixed values together must make a valid config (e.g. depth vs per-stage lists)."""
    for section, config_type in (("search", UNetConfig), ("train", TrainConfig)):
        fixed = {
            k: v for k, v in getattr(space, section).items() if not is_searched(v) and v != AUTO
        }
        try:
            config_type(**fixed)
        except ValidationError as err:
            loc = err.errors()[0]["loc"]
            # A bound on one field (epochs >= 1) names it; a rule across fields the section.
            where = f"{section}.{loc[0]}" if loc and loc[0] in fixed else section
            raise SpaceError(where, first_message(err).removeprefix("Value error, ")) from None


def _check_validation_every(space: SearchSpace) -> None:
    """A validation every N epochs needs N within the training's epochs."""
    every = space.study.validation.every
    epochs = space.train.get("epochs", TrainConfig.__pydantic_fields__["epochs"].default)
    top = epochs
    if not isinstance(epochs, int):  # searched: the most any candidate trains
        top = max(max(s.choices) if isinstance(s, CategoricalSpec) else s.high for s in epochs)
    if every is not None and every > top:
        raise SpaceError(
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
                raise SpaceError(
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
    if not is_searched(entry):
        return [(where, entry)]
    patches = []
    for i, spec in enumerate(entry):
        at = where if len(entry) == 1 else f"{where}[{i}]"
        patches += [(f"{at}.choices[{j}]", choice) for j, choice in enumerate(spec.choices)]
        if spec.default is not None:
            patches.append((f"{at}.default", tuple(spec.default)))
    return patches


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
