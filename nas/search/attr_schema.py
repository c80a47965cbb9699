"""What each user attr of a trial and of a study must hold, and the check that refuses one
that does not.

Optuna keeps user attrs as JSON, so a storage edited by hand or written by another program
may hold anything under a name nas reads. `check_attrs` turns such a value into one NasError
naming the trial or study and the attr, before it is used, instead of a traceback far from
it; `read_config` does the same for a recorded config read through its schema. The names and
their fields live in nas/search/record.py; this module knows what each must hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from nas.core.errors import NasError, validation_problem
from nas.search.objectives import OBJECTIVES, QUANTITY_ATTRS

LATENCY_IQR_ATTR = OBJECTIVES["latency_ms"].spread_attr
REJECTED_ATTR = "rejected"  # the constraint a candidate broke before it trained
HEARTBEAT_ATTR = "heartbeat_at"

# What a user attr must hold, in the words a refusal uses (None is always "not recorded").
NUMBER = "a number"
INTEGER = "a whole number"
TEXT = "text"
FLAG = "true or false"
MAPPING = "a mapping"
NUMBERS = "a list of numbers"
INTEGERS = "a list of whole numbers"
TEXTS = "a list of texts"
MAPPINGS = "a list of mappings"
SCORES = "a mapping of names to numbers"
CASE_COUNTS = "per-case counts by epoch (epoch: cases x 3 x classes of numbers)"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


def _is_scores(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and (v is None or _is_number(v)) for k, v in value.items()
    )


def _is_case_counts(value: Any) -> bool:
    """{"epoch": [[[tp, fp, fn] per class] per case]}, as scoring.kept_counts writes it."""
    if not isinstance(value, dict):
        return False
    shapes = set()
    for epoch, cases in value.items():
        if not (isinstance(epoch, str) and epoch.isdigit() and isinstance(cases, list)):
            return False
        for case in cases:
            if not (isinstance(case, list) and len(case) == 3):
                return False
            for row in case:
                if not (isinstance(row, list) and all(map(_is_number, row))):
                    return False
                shapes.add(len(row))
        shapes.add(("cases", len(cases)))
    return len(shapes) <= 2  # one number of classes, one number of cases


_HOLDS = {
    NUMBER: _is_number,
    INTEGER: _is_integer,
    TEXT: lambda v: isinstance(v, str),
    FLAG: lambda v: isinstance(v, bool),
    MAPPING: lambda v: isinstance(v, dict),
    NUMBERS: lambda v: isinstance(v, list) and all(map(_is_number, v)),
    INTEGERS: lambda v: isinstance(v, list) and all(map(_is_integer, v)),
    TEXTS: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    MAPPINGS: lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    SCORES: _is_scores,
    CASE_COUNTS: _is_case_counts,
}

# The user attrs of a trial, by what they hold (those TrialRecord reads; others are ignored).
TRIAL_ATTRS = {
    **dict.fromkeys([*QUANTITY_ATTRS.values(), LATENCY_IQR_ATTR, HEARTBEAT_ATTR], NUMBER),
    **dict.fromkeys(["seconds", "segment_seconds", "search_val_iou"], NUMBER),
    **dict.fromkeys(["epochs_run", "fidelity_steps", "continues", "lineage", "until"], INTEGER),
    **dict.fromkeys(["steps", "retry_of", "source_trial", "fold"], INTEGER),
    **dict.fromkeys(["device", "summary", "fail_reason", REJECTED_ATTR, "worker"], TEXT),
    "artifact_error": TEXT,
    **dict.fromkeys(["stopped_by_time", "warm_start"], FLAG),
    **dict.fromkeys(["unet_config", "train_config"], MAPPING),
    "val_case_counts": CASE_COUNTS,
    "best": SCORES,
    **dict.fromkeys(["train_loss", "epoch_seconds", "val_iou_per_class"], NUMBERS),
    "rungs": INTEGERS,
    "class_names": TEXTS,
    "out_of_fold": MAPPINGS,
}

# The user attrs of a study, by what they hold.
STUDY_ATTRS = {
    "objectives": TEXTS,
    "rung_correlations": MAPPINGS,
    "artifacts": TEXT,
    **dict.fromkeys(
        [
            "constraints", "space", "data_config", "data_description", "patch_plan",
            "validation", "data_cases", "test_scores", "postprocessing", "heldout_ensemble",
            "all_cases", "member_ensembles", "volume_scores",
        ],
        MAPPING,
    ),
}  # fmt: skip


def check_attrs(attrs: Mapping[str, Any], kinds: Mapping[str, str], source: str) -> None:
    """Refuse, naming `source` and the attr, a user attr that does not hold what `kinds`
    says it must (a storage edited by hand or by another program): one pass, no copies,
    as records are read for every trial of a study."""
    for name, value in attrs.items():
        kind = kinds.get(name)
        if kind is not None and value is not None and not _HOLDS[kind](value):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise NasError(source, f"attr {name} is {shown}, not {kind}")


def read_config(
    make: Callable[[Any], Any], values: Mapping[str, Any], source: str, attr: str
) -> Any:
    """`make(values)`, a recorded config read through its schema; a NasError naming `source`
    and `attr` where the schema refuses it."""
    try:
        return make(values)
    except (ValidationError, TypeError, ValueError) as err:
        raise NasError(
            source, f"attr {attr} does not hold valid settings ({validation_problem(err)})"
        ) from None
