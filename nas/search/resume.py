"""What a study records about how it was made, and the check that a resume keeps to it.

A new study stores its effective search space (`space`), its data settings (`data_config`),
the preprocessing and labels they gave (`data_description`) and the cases on each side of the
split (`data_cases`). Resuming with other data is refused: the front would mix datasets and
older trials would export with the wrong preprocessing. Resuming with another search space
is refused too, unless the user asks to extend it (`--extend-space`) and every parameter the
study already drew keeps a distribution Optuna can continue. Resuming with other validation
patches (their count, foreground share or seed) is refused: new scores would not compare
with the study's. Each refusal is one line saying what differs. Studies written before these
records existed get them on their next run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import check_distribution_compatibility

from nas.core.errors import NasError
from nas.search.draw import param_distribution
from nas.search.record import StudyRecord, write_study
from nas.search.space import SearchSpace, describe_space


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _differences(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                found.append(f"{where} was {json.dumps(old[key])}, now unset")
            elif key not in old:
                found.append(f"{where} is new ({json.dumps(new[key])})")
            else:
                found += _differences(old[key], new[key], where)
        return found
    if old == new:
        return []
    names = isinstance(old, list) and isinstance(new, list)
    if names and all(isinstance(item, str) for item in old + new):  # case names: say which
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        return [f"{path}: {_few(added)} added, {_few(removed)} removed"]
    return [f"{path} was {json.dumps(old)}, now {json.dumps(new)}"]


def _few(items: Sequence[str]) -> str:
    shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
    return f"{len(items)} ({shown})" if items else "0"


def _say(differences: Sequence[str]) -> str:
    shown = "; ".join(differences[:3])
    return shown + (f" (and {len(differences) - 3} more)" if len(differences) > 3 else "")


def record(study: optuna.Study, space: SearchSpace, data: dict[str, Any]) -> None:
    """Store what the study is made of; `data`: data_config, data_description, patch_plan,
    data_cases."""
    write_study(study, space=describe_space(space), **_plain(data))


def check(
    study: optuna.Study,
    space: SearchSpace,
    data: dict[str, Any],
    source: Path,
    extend_space: bool,
) -> None:
    """Refuse to resume `study` with other data, or another space unless `extend_space`;
    store what is missing (a study from an earlier release) or what was extended."""
    stored = StudyRecord.of(study)
    data = _plain(data)
    name = study.study_name
    for key, where, what in (
        ("data_config", "data", "data settings"),
        ("data_description", "", "preprocessing or labels (the dataset changed on disk?)"),
        ("data_cases", "cases", "training and validation cases"),
    ):
        kept = getattr(stored, key)
        if kept is not None and kept != data[key]:
            raise NasError(
                source,
                f"study {name!r} was made with other {what}: "
                f"{_say(_differences(kept, data[key], where))}; "
                "resume it with its own data, or choose a new --study-name",
            )
    space_now = describe_space(space)
    if stored.space is not None and stored.space != space_now:
        differences = _say(_differences(stored.space, space_now, ""))
        if not extend_space:
            raise NasError(
                source,
                f"study {name!r} was made with another search space: {differences}; pass "
                "--extend-space to continue it with this one, or choose a new --study-name",
            )
        _check_compatible(study, space, source)
    # Constraints decide which trials count (feasibility): changing them silently would
    # rewrite the front and the report of what the study found.
    constraints = _plain(
        {k: b.model_dump(exclude_none=True) for k, b in space.study.constraints.items()}
    )
    changed = stored.constraints is not None and stored.constraints != constraints
    if changed and not extend_space:
        raise NasError(
            source,
            f"study {name!r} was made with other constraints: "
            f"{_say(_differences(stored.constraints, constraints, 'constraints'))}; pass "
            "--extend-space to continue it with these, or choose a new --study-name",
        )
    if stored.constraints != constraints:
        write_study(study, constraints=constraints)
    _check_validation(stored.validation, validation_record(space), name, source)
    missing = {k: v for k, v in data.items() if getattr(stored, k) is None}
    if missing or stored.space != space_now:
        record(study, space, missing)


# What makes two validation scores comparable: the same fixed patches (nas.validation.validate's
# ValidationPatches), drawn from these. `every` and `bootstrap` may change on a resume.
_PATCH_FIELDS = {
    "cases": "study.validation.cases",
    "patches_per_case": "study.validation.patches_per_case",
    "foreground_fraction": "study.validation.foreground_fraction",
    "seed": "study.seed",
}


def validation_record(space: SearchSpace) -> dict[str, Any]:
    """How a run validates, as its study keeps it: the space's validation settings and the
    seed its patches are drawn with."""
    return space.study.validation.model_dump() | {"seed": space.study.seed}


def _check_validation(kept: Any, now: dict[str, Any], name: str, source: Path) -> None:
    """Refuse a resume that would score new candidates on other patches than the study's:
    their scores, ranked against the old ones, would compare different tests."""
    changed = [
        f"{where} {kept[key]} -> {now[key]}"
        for key, where in _PATCH_FIELDS.items()
        if kept and key in kept and kept[key] != now[key]
    ]
    if changed:
        raise NasError(
            source,
            f"study {name!r} was validated on other patches: {'; '.join(changed)}; its scores "
            "would not compare with new ones: resume it with its own values, or choose a new "
            "--study-name",
        )


def _check_compatible(study: optuna.Study, space: SearchSpace, source: Path) -> None:
    """Every parameter the study has drawn must keep a distribution Optuna accepts (the same
    kind; categorical choices unchanged)."""
    seen: dict[str, optuna.distributions.BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False):
        seen.update(trial.distributions)
    for param, old in sorted(seen.items()):
        new = param_distribution(space, param)
        if new is None:
            continue  # no longer searched: older trials keep their values
        try:
            check_distribution_compatibility(old, new)
        except ValueError as err:
            raise NasError(
                source,
                f"cannot extend study {study.study_name!r}: parameter {param} was drawn from "
                f"{old}, now {new} ({err})",
            ) from None
