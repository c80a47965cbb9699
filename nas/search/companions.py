"""The studies nas keeps beside a search, in the search's storage: `<study>-retrain` (what
nas.retrain trained again, or on all cases) and `<study>-crossval` (nas.retrain --folds: one
trial per member and fold). Their names, opening and finding them, a member's runs, and
the cross-validation's tables.

Without torch: export, report and the weights finder read them without training anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.search.objectives import directions
from nas.search.record import StudyRecord, TrialRecord, write_study

Storage = optuna.storages.BaseStorage | str


def retrain_study_name(study_name: str) -> str:
    return f"{study_name}-retrain"


def crossval_study_name(study_name: str) -> str:
    return f"{study_name}-crossval"


def _find(storage: Storage, name: str) -> optuna.Study | None:
    if name not in optuna.get_all_study_names(storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


def find_retrain_study(search: optuna.Study) -> optuna.Study | None:
    """`search`'s retraining, if nas.retrain ran."""
    return _find(search._storage, retrain_study_name(search.study_name))


def find_crossval_study(search: optuna.Study) -> optuna.Study | None:
    """`search`'s cross-validation, if nas.retrain --folds ran."""
    return _find(search._storage, crossval_study_name(search.study_name))


def _open(storage: Storage, name: str, objectives: Sequence[str]) -> optuna.Study:
    study = optuna.create_study(
        storage=storage, study_name=name, directions=directions(objectives), load_if_exists=True
    )
    write_study(study, objectives=list(objectives))
    return study


def open_retrain_study(storage: Storage, study_name: str, objectives: Sequence[str]):
    """`<study>-retrain`, created if new, with the search's objectives."""
    return _open(storage, retrain_study_name(study_name), objectives)


def open_crossval_study(storage: Storage, study_name: str, objectives: Sequence[str]):
    """`<study>-crossval`, created if new, with the search's objectives."""
    return _open(storage, crossval_study_name(study_name), objectives)


def completed_runs(companion: optuna.Study, trial_number: int) -> list[FrozenTrial]:
    """The completed runs of search trial `trial_number` in a companion study (retrained,
    or one per fold), oldest first."""
    runs = companion.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in runs if TrialRecord.of(t).source_trial == trial_number]


def member_runs(crossval: optuna.Study, trial_number: int) -> list[FrozenTrial]:
    """One member's completed runs, by fold, trained with the epochs of its latest run: runs
    of another length are not mixed into its mean (a fold that failed is left out)."""
    completed = completed_runs(crossval, trial_number)
    if not completed:
        return []
    epochs = TrialRecord.of(completed[-1]).epochs
    runs = {
        record.fold: t
        for t, record in zip(completed, map(TrialRecord.of, completed), strict=True)
        if record.epochs == epochs
    }
    return [runs[fold] for fold in sorted(runs)]


def summary_rows(crossval: optuna.Study, search: optuna.Study) -> list[dict]:
    """One row per cross-validated member: mean and sd over folds, out-of-fold Dice without
    and with the largest component, and the postprocessing chosen."""
    by_number = {t.number: t for t in search.get_trials(deepcopy=False)}
    postprocessing = StudyRecord.of(crossval).postprocessing
    numbers = sorted({TrialRecord.of(t).source_trial for t in crossval.get_trials(deepcopy=False)})
    rows = []
    for number in numbers:
        runs = member_runs(crossval, number)
        if not runs:
            continue
        iou = np.array([TrialRecord.of(r).iou for r in runs], float)
        dice = np.array([TrialRecord.of(r).quantity("dice") for r in runs], float)
        # NaN for folds run before case Dice was recorded.
        case_dice = np.array([TrialRecord.of(r).quantity("case_dice") for r in runs], float)
        cases = [case for run in runs for case in TrialRecord.of(run).out_of_fold]
        search_trial = by_number.get(number)
        rows.append(
            {
                "trial": number,
                "n_params": TrialRecord.of(runs[0]).n_params,
                "folds": " ".join(str(TrialRecord.of(r).fold) for r in runs),
                "epochs": TrialRecord.of(runs[0]).epochs,
                "search_val_iou": TrialRecord.of(search_trial).iou if search_trial else None,
                "cv_iou_mean": float(iou.mean()),
                "cv_iou_sd": float(iou.std(ddof=1)) if len(iou) > 1 else None,
                "cv_dice_mean": float(dice.mean()),
                "cv_dice_sd": float(dice.std(ddof=1)) if len(dice) > 1 else None,
                "cv_case_dice_mean": float(case_dice.mean()),
                "cv_case_dice_sd": float(case_dice.std(ddof=1)) if len(case_dice) > 1 else None,
                "oof_case_dice": float(np.mean([c["dice"] for c in cases])),
                "oof_case_dice_largest": float(np.mean([c["dice_largest"] for c in cases])),
                "largest_component": " ".join(postprocessing.get(str(number), [])),
            }
        )
    return rows


def ensemble_rows(crossval: optuna.Study) -> list[dict]:
    stored = StudyRecord.of(crossval).heldout_ensemble
    # A cross-member ensemble (key -1) after the members it combines.
    order = sorted(stored, key=lambda n: (int(n) < 0, int(n)))
    return [row for number in order for row in stored[number]]


def recorded(crossval: optuna.Study | None) -> tuple[list[dict], dict | None]:
    stored = StudyRecord.of(crossval).member_ensembles if crossval is not None else {}
    return stored.get("rows", []), stored.get("chosen")


def chosen_trials(chosen: dict) -> list[int]:
    return [int(n) for n in chosen["members"].split(" + ")]
