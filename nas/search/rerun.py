"""A search trial's network trained again (nas.retrain, a fold of cross-validation), as a
finished trial of the study beside the search (`<study>-retrain`, `<study>-crossval`): the
costs the search measured, the scores of the new training, its curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from optuna.trial import FrozenTrial, create_trial

from nas.search.objectives import QUANTITY_ATTRS, values_of
from nas.search.record import TrialRecord


def rerun_trial(
    source: FrozenTrial,
    scores: Mapping[str, float],
    objectives: Sequence[str],
    user_attrs: Mapping[str, Any],
    curve: Mapping[int, float],
) -> FrozenTrial:
    """A finished trial of `source`'s network trained again (nas.retrain, a fold of
    nas.evaluation.crossval): its costs as the search measured them, `scores` (iou, dice, params)
    from the new training, `curve` its IoU per epoch."""
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
