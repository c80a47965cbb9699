"""Draw a `Candidate` from a search space on an Optuna trial, and the reverse questions: which
parameter values would draw given fields (a warm start, `study.enqueue`), and which
distribution a parameter is drawn from (a resume's check).

Each section is drawn in file order, a spec only when its `when` holds for what was drawn
before it; a field whose specs do not apply keeps its default. Optuna stores a patch choice
[96, 96] as the string "96x96", which is also how optuna-dashboard and trials.csv show it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import optuna

from nas.network.unet_config import UNetConfig, per_stage_length
from nas.search.candidate import Candidate
from nas.search.space import SearchSpace
from nas.search.space_spec import CategoricalSpec, FloatSpec, IntSpec, Scalar, Spec, is_searched
from nas.training.train_config import TrainConfig

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
    if not is_searched(entry):
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


def _condition_holds(when: dict[str, Any] | None, values: dict[str, Any]) -> bool:
    for name, expected in (when or {}).items():
        allowed = expected if isinstance(expected, list) else [expected]
        if values.get(name) not in allowed:
            return False
    return True


# Draws one value: suggest(optuna_param_name, field, stage_index_or_None, spec).
Suggest = Callable[[str, str, "int | None", Spec], Any]
_UNSET = object()  # a warm-start entry that leaves a parameter to the sampler


def _optuna_suggest(trial: optuna.Trial) -> Suggest:
    def suggest(param: str, field: str, stage: int | None, spec: Spec) -> Any:
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
        if not is_searched(entry):
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

    def record(param: str, field: str, stage: int | None, spec: Spec) -> Any:
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


def _in_spec(value: Any, spec: Spec) -> bool:
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
