"""The workflow of `nas export`: from a study's results folder to a model folder. A front
member with the weights asked for and the postprocessing its cross-validation chose, or the
ensemble of members cross-validation chose out of fold; each into results/<study>/export/
unless told where, the storage recorded as an absolute URL so the card reads from any folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.staging import check_output_folder
from nas.deploy.export import export, export_members
from nas.search.weights import find_weights, trial_name

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from nas.network.model_card import ModelCard
    from nas.search.weights import TrialWeights


@dataclass(frozen=True)
class ExportedMember:
    """A front member as exported: its weights, its card and its folder."""

    weights: TrialWeights
    card: ModelCard
    out: Path


@dataclass(frozen=True)
class ExportedEnsemble:
    """The ensemble cross-validation chose, as exported: its members, the choice's row (its
    out-of-fold scores) and its folder."""

    trials: list[FrozenTrial]
    chosen: dict
    out: Path


def export_member(
    study: optuna.Study,
    results: Path,
    trial: FrozenTrial,
    wanted: str,
    out: Path | None,
    formats: Sequence[str],
    storage: str | None,
    force: bool,
    tta: str,
) -> ExportedMember:
    """Export `trial` of the study in `results` with its `wanted` weights (a kind, or auto)
    into `out` (default results/export/trial_NNNN), with the postprocessing its
    cross-validation chose; `storage`: the URL given, default the folder's study.db."""
    from nas.search.companions import find_crossval_study
    from nas.search.record import StudyRecord
    from nas.search.study import default_storage

    weights = find_weights(study, results, trial, wanted)
    crossval = find_crossval_study(study)
    postprocessing = []
    if crossval is not None:
        postprocessing = StudyRecord.of(crossval).postprocessing.get(str(trial.number), [])
    out = out or results / "export" / trial_name(trial.number)
    check_output_folder(out.parent)
    if storage is None:  # recorded absolute, for use from any folder
        storage = default_storage(results.resolve())
    storage = storage or default_storage(results)
    card = export(
        study, trial, weights.files, out, formats, storage, force, results, tta,
        postprocessing, weights.describe(results),
    )  # fmt: skip
    return ExportedMember(weights, card, out)


def export_chosen_ensemble(
    study: optuna.Study,
    results: Path,
    out: Path | None,
    formats: Sequence[str],
    storage: str | None,
    weights_kind: str,
    force: bool,
    tta: str,
) -> ExportedEnsemble:
    """Export the ensemble `nas retrain --folds` chose out of fold into `out` (default
    results/export/ensemble_A_B), each member with its `weights_kind` weights; a NasError
    where none was chosen, or where one member alone beat every ensemble."""
    from nas.search.companions import chosen_trials, find_crossval_study, recorded
    from nas.search.study import default_storage

    _, chosen = recorded(find_crossval_study(study))
    if chosen is None:
        raise NasError(
            "--ensemble members",
            f"study {study.study_name!r} has no ensemble chosen out of fold: run nas retrain "
            f"{results} --trials A,B --folds all first",
        )
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    trials = [by_number[n] for n in chosen_trials(chosen)]
    if len(trials) == 1:
        raise NasError(
            "--ensemble members",
            f"out of fold, trial {trials[0].number} alone beat every ensemble; export it with "
            f"--trial {trials[0].number}",
        )
    name = "ensemble_" + "_".join(str(t.number) for t in trials)
    out = out or results / "export" / name
    check_output_folder(out.parent)
    storage = storage or default_storage(results.resolve())
    postprocessing = chosen["largest_component"].split()
    scores = {"oof_iou": chosen["oof_iou"], "oof_dice": chosen["oof_dice"]}
    export_members(study, results, trials, out, formats, storage, weights_kind, force, tta,
                   postprocessing, scores)  # fmt: skip
    return ExportedEnsemble(trials, chosen, out)
