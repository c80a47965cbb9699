"""What a search run uses from the floors above nas.search (`RunHooks`), handed in by its
command: the `--device` option (nas.commands.cli) and scoring the front after the search
(nas.evaluation.heldout). The run calls them; it never imports them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.data.test_split import TestSplit
    from nas.search.candidate_state import TrainingData


@dataclass(frozen=True)
class RunHooks:
    """What a search run calls that lives above nas.search, given by the command: the
    `--device` option's device (or a NasError naming it), and the front scored after the
    search (nas.evaluation.heldout)."""

    device: Callable[[str], torch.device]
    score_validation_volumes: Callable[  # -> the seconds it took
        [optuna.Study, Path, list[FrozenTrial], TrainingData, torch.device], float
    ]
    score_test_cases: Callable[
        [optuna.Study, Path, list[FrozenTrial], TestSplit, torch.device], None
    ]
