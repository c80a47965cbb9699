"""Write one architecture of the front, or an ensemble, as a model folder: architecture.yaml
(the model card), weights.pt, the pt2 and ONNX programs checked against the eager network
(`programs.py`), and a README (`readme.py`); into a destination nas made or was told to make,
never over a foreign file (`export_checks.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.staging import (
    remove_stale_staging,
    replace_folder,
    staging_folder,
)
from nas.deploy.export_checks import check_destination, check_ensemble_destination
from nas.deploy.programs import example_input, write_networks
from nas.deploy.readme import README_FILE, ensemble_readme, model_readme
from nas.search.weights import find_weights, trial_name

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from nas.data.labels import LabelScheme
    from nas.network.builder import UNet
    from nas.network.model_card import Inference, ModelCard
    from nas.network.unet_config import UNetConfig
    from nas.search.record import StudyRecord
    from nas.training.train_config import TrainConfig


def _data_description(study: optuna.Study) -> dict:
    from nas.data import DataConfig, load_dataset
    from nas.network.model_card import describe_data
    from nas.search.record import StudyRecord

    recorded = StudyRecord.of(study)
    if recorded.data_description is not None:
        return _checked_description(study, dict(recorded.data_description))
    if recorded.data_config is None:  # a study from before nas.run recorded either
        raise NasError(study.study_name, "does not record its data settings")
    return describe_data(load_dataset(DataConfig(**recorded.data_config)))


def _checked_description(study: optuna.Study, data: dict) -> dict:
    """The study's record of its preprocessing and labels, read through the models that
    wrote it (model_card.Preprocessing, LabelScheme): a record that is not what nas wrote is
    one line naming the study and the field."""
    from nas.core.errors import validation_problem
    from nas.data.labels import LabelScheme
    from nas.network.model_card import Preprocessing

    try:
        Preprocessing.model_validate(data["preprocessing"])
        LabelScheme.from_description(data)
    except KeyError as err:
        problem = f"it lacks {err}"
    except (TypeError, ValueError, AttributeError) as err:  # pydantic's ValidationError too
        problem = validation_problem(err)
    else:
        return data
    raise NasError(f"study {study.study_name!r}", f"attr data_description: {problem}")


def _given_weights(weights: Path | dict[str, Path]) -> dict:
    """source.weights for weights handed to `export` without a description."""
    if isinstance(weights, Path):
        return {"kind": "file", "path": str(weights)}
    return {"kind": "files", "path": {name: str(path) for name, path in weights.items()}}


def _deployed_networks(unet, members: dict[str, Path]) -> tuple:
    """(the deployed UNetConfig, {member name: network in eval mode}): each member's weights
    loaded into the trained network, then deep supervision's heads dropped."""
    from nas.network.builder import build_unet, deployed
    from nas.network.state_dict import load_weights

    networks = {}
    deployed_unet = unet
    for name, path in members.items():
        trained = build_unet(unet)
        load_weights(trained, path)
        deployed_unet, state = deployed(unet, trained.state_dict())
        networks[name] = build_unet(deployed_unet)
        networks[name].load_state_dict(state)
        networks[name].eval()
    return deployed_unet, networks


def _source(study, trial, record, model, recorded, storage: str, weights_source: dict) -> dict:
    """The card's `source`: where the model came from (`recorded`: the study's StudyRecord)
    and what the search measured: its score on the validation patches and, once the run
    scored its front on the whole validation volumes, that score too."""
    import torch

    from nas.network.builder import count_parameters
    from nas.search.objectives import OBJECTIVES
    from nas.search.record import study_objectives
    from nas.search.storage import redact

    data_config = recorded.data_config or {}
    whole_volumes = recorded.volume_scores.get(str(trial.number), {})
    return {
        "study": study.study_name,
        "trial": trial.number,
        "storage": redact(storage),
        "n_params": count_parameters(model),
        "val_iou": record.iou,
        "val_dice": record.quantity("dice"),
        "val_case_dice": record.quantity("case_dice"),
        "volume_val_iou": whole_volumes.get("iou"),
        "objectives": study_objectives(study).names,
        # Every measured objective, as the search recorded it (None: not measured).
        "measured": {name: record.quantity(name) for name in OBJECTIVES},
        "dataset": data_config.get("path"),
        "fold": data_config.get("fold"),
        "epochs_run": record.epochs_run,
        # The weights exported: kind, path (relative to the results folder), their scores.
        "weights": weights_source,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def _label_scheme(
    study: optuna.Study, trial: FrozenTrial, unet: UNetConfig, data: dict
) -> LabelScheme:
    """The study's label scheme, refused where the trial's network has other outputs."""
    from nas.data.labels import LabelScheme

    scheme = LabelScheme.from_description(data)
    if unet.out_channels != scheme.out_channels:
        raise NasError(
            study.study_name,
            f"trial {trial.number} has {unet.out_channels} outputs; the study's labels give "
            f"{scheme.out_channels} ({scheme.output})",
        )
    return scheme


def _inference(
    unet: UNetConfig, train: TrainConfig, recorded: StudyRecord, model: UNet,
    scheme: LabelScheme, tta: str,
) -> Inference:  # fmt: skip
    """How the exported network is run: its patch, the slice axis of a 2D network, the size
    multiple its inputs need, its output and test-time augmentation."""
    from nas.network.model_card import Inference

    data_config = recorded.data_config or {}
    return Inference(
        spatial_dims=unet.spatial_dims,
        slice_axis=data_config.get("slice_axis", 2),
        patch_size=train.patch_size(unet.spatial_dims),
        size_multiple=model.size_multiple,
        output=scheme.output,
        tta=tta,
    )


def _kept(results: Path | None, storage: str, members: dict[str, Path]) -> dict[Path, str]:
    """The study's own files an export never replaces, each with what it is: its results
    folder, its database, the weights exported."""
    from nas.search.storage import local_file

    keep = {results: "results folder"} if results is not None else {}
    database = local_file(storage)
    keep |= {database: "database"} if database else {}
    keep |= {path: "weights" for path in members.values()}
    return keep


def _card(
    unet: UNetConfig, data: dict, inference: Inference, source: dict,
    postprocessing: Sequence[str], members: dict[str, Path],
) -> ModelCard:  # fmt: skip
    from nas.network.model_card import ModelCard, Postprocessing

    return ModelCard(
        architecture=unet.to_dict(),
        preprocessing=data["preprocessing"],
        inference=inference,
        labels=data["labels"],
        regions=data.get("regions"),
        regions_class_order=data.get("regions_class_order"),
        source=source,
        postprocessing=Postprocessing(largest_component=tuple(postprocessing)),
        members=tuple(name for name in members if name),
    )


def export(
    study: optuna.Study,
    trial: FrozenTrial,
    weights: Path | dict[str, Path],
    out: Path,
    formats: Sequence[str],
    storage: str,
    force: bool = False,
    results: Path | None = None,
    tta: str = "none",
    postprocessing: Sequence[str] = (),
    weights_source: dict | None = None,
) -> ModelCard:
    """Write `trial` with `weights` as a model folder at `out`. `weights`: one file, or an
    ensemble's members by subfolder name. `tta`, `postprocessing` (class names reduced to
    their largest component) and `weights_source` (which weights these are, as
    `TrialWeights.describe` gives it; default: the file's path) go into the card. `storage`
    is only recorded, without its password; `results`, the study's folder, is never replaced
    or deleted."""
    from nas.network.model_card import write_card
    from nas.search.record import StudyRecord, TrialRecord

    record = TrialRecord.of(trial)
    candidate = record.candidate()
    unet, train = candidate.unet, candidate.train
    data = _data_description(study)
    scheme = _label_scheme(study, trial, unet, data)
    members = {"": weights} if isinstance(weights, Path) else dict(weights)
    unet, networks = _deployed_networks(unet, members)
    model = next(iter(networks.values()))
    recorded = StudyRecord.of(study)
    inference = _inference(unet, train, recorded, model, scheme, tta)
    given = weights_source or _given_weights(weights)
    source = _source(study, trial, record, model, recorded, storage, given)
    keep = _kept(results, storage, members)
    check_destination(out, source, force, keep)
    remove_stale_staging(out.parent)
    with staging_folder(out) as staging:
        example = example_input(model, inference, unet.in_channels)
        source["max_abs_difference_from_eager"] = write_networks(
            staging, networks, example, formats
        )
        card = _card(unet, data, inference, source, postprocessing, members)
        write_card(staging, card)
        (staging / README_FILE).write_text(model_readme(card, formats))
        check_destination(out, source, force, keep)  # again: the export took a while
        replace_folder(staging, out)
    return card


def _member_weights(study: optuna.Study, results: Path, trial: FrozenTrial, wanted: str):
    """An ensemble member's weights: with "auto", its all-cases model where nas retrain
    --all-cases trained one, else its folds, the models the ensemble was chosen on."""
    if wanted != "auto":
        return find_weights(study, results, trial, wanted)
    try:
        return find_weights(study, results, trial, "all-cases")
    except NasError:
        return find_weights(study, results, trial, "folds")


def export_members(
    study: optuna.Study,
    results: Path,
    trials: Sequence[FrozenTrial],
    out: Path,
    formats: Sequence[str],
    storage: str,
    weights_kind: str = "auto",
    force: bool = False,
    tta: str = "none",
    postprocessing: Sequence[str] = (),
    scores: dict | None = None,
) -> list[str]:
    """Write different networks as one ensemble folder: a model folder per trial (each as
    `export` writes it, with its `weights_kind` weights; auto: its all-cases model, else its
    folds) and ensemble.yaml; nas.predict averages their probabilities. The member folders'
    names."""
    from nas.network.model_card import EnsembleCard, Postprocessing, write_ensemble_card
    from nas.search.storage import redact

    source = {
        "study": study.study_name,
        "trials": [t.number for t in trials],
        "storage": redact(storage),
        "chosen_by": "cross-validation, out of fold",
        **(scores or {}),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    keep = {results: "results folder"}
    found = [_member_weights(study, results, t, weights_kind) for t in trials]
    check_ensemble_destination(out, source, force, keep)
    remove_stale_staging(out.parent)
    names = [trial_name(t.number) for t in trials]
    with staging_folder(out) as staging:
        for trial, weights, name in zip(trials, found, names, strict=True):
            export(study, trial, weights.files, staging / name, formats, storage, True, results,
                   tta, (), weights.describe(results))  # fmt: skip
        card = EnsembleCard(
            members=tuple(names),
            postprocessing=Postprocessing(largest_component=tuple(postprocessing)),
            source=source,
        )
        write_ensemble_card(staging, card)
        readme = ensemble_readme(study.study_name, names, postprocessing)
        (staging / README_FILE).write_text(readme)
        check_ensemble_destination(out, source, force, keep)
        replace_folder(staging, out)
    return names
