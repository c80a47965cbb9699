"""Front members retrained on the search's split at the full budget: each trained again for
longer (3x the search's epochs, or --epochs) with checkpoints (nas.evaluation.retrain_plan),
validated after each epoch as its search validated, scored on the whole validation volumes at
the end, and recorded as a trial of `<study>-retrain` (labelled with the trial it came from)
and a row of results/<study>/retrained.csv. The final weights and those of the best epoch go
to results/<study>/retrained/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nas.core.staging import atomic_write
from nas.evaluation.retrain_plan import (
    RetrainOptions,
    retrain_study_of,
    run_plan,
    train_member,
    write_last_checkpoint,
)
from nas.search.weights import retrained_dir, retrained_path

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.data import Case, DataConfig, Dataset, Slicing
    from nas.data.labels import LabelScheme
    from nas.network.builder import UNetConfig
    from nas.search.trial_files import TrialFiles
    from nas.training.fit import ValidationPlan
    from nas.training.resumable import Best, Checkpoint
    from nas.training.train_config import TrainConfig


def run_retrain(
    options: RetrainOptions,
    study: optuna.Study,
    chosen: list[FrozenTrial],
    data_cfg: DataConfig,
    storage: str,
    device: torch.device,
) -> int:
    """Train each chosen member again on the search's split for longer (3x the search's
    epochs, or --epochs), recorded in the retrain study and retrained.csv."""
    import pandas as pd

    from nas.data import load_dataset, split_dataset
    from nas.search.storage import redact

    dataset = load_dataset(data_cfg)
    train_cases, val_cases = split_dataset(dataset, data_cfg)
    retrain_study = retrain_study_of(study, storage)
    rows = []
    for trial in chosen:
        row = _retrain_one(options, study, retrain_study, trial, dataset, (train_cases, val_cases),
                           data_cfg, device)  # fmt: skip
        if row is not None:
            rows.append(row)
    if not rows:  # each failed or had finished: the last table stands
        print(f"recorded in study {retrain_study.study_name!r} of {redact(storage)}")
        return 0
    table = pd.DataFrame(rows)
    atomic_write(options.results / "retrained.csv", lambda p: table.to_csv(p, index=False))
    print(
        f"recorded in study {retrain_study.study_name!r} of {redact(storage)} "
        f"and {options.results}/retrained.csv"
    )
    return 0


def _retrain_one(
    options: RetrainOptions,
    study: optuna.Study,
    retrain_study: optuna.Study,
    trial: FrozenTrial,
    dataset: Dataset,
    cases: tuple[list[Case], list[Case]],
    data_cfg: DataConfig,
    device: torch.device,
) -> dict | None:
    """One member retrained and recorded: its row of retrained.csv, or None when it failed
    (recorded as a FAIL, as nas.run would) or its run had finished before --continue."""
    from optuna.trial import TrialState, create_trial

    from nas.network.builder import count_parameters
    from nas.search.record import TrialRecord, carried
    from nas.search.weights import save_checkpoint
    from nas.training.fit import CandidateFailed, init_model

    record = TrialRecord.of(trial)
    unet = record.unet()
    plan = run_plan(options, study, trial, data_cfg)
    train = plan[0]
    # Every training slice: the search may have used a few per case.
    slicing = dataclasses.replace(data_cfg.slicing, per_case=None)
    validation = epoch_validation(study, cases[1], slicing)
    n_params = count_parameters(init_model(unet, train.seed))
    print(f"retraining trial {trial.number} ({n_params:,} params) for {train.epochs} epochs "
          f"of {train.batches_per_epoch} batches")  # fmt: skip
    try:
        trained = train_member(options, trial, plan, cases, dataset, data_cfg, device, validation)
    except CandidateFailed as failure:  # as nas.run: the trial fails, the others go on
        attrs = carried(source_trial=trial.number, fail_reason=failure.reason)
        retrain_study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=attrs))
        print(f"  trial {trial.number}: failed ({failure.reason})")
        return None
    if trained is None:
        return None
    model, end = trained
    best = end.best
    _save_best(options.files, trial.number, best)
    options.files.publish(save_checkpoint(retrained_dir(options.results), trial.number,
                                          model.state_dict()))  # fmt: skip
    last = _final_scores(model, end.history[-1], validation, cases[1], dataset.scheme,
                         train.patch_size(unet.spatial_dims), device, slicing)  # fmt: skip
    scores = {"iou": last["val_iou"], "dice": last["val_dice"],
              "case_dice": last.get("val_case_dice"), "params": n_params}  # fmt: skip
    _record_retrained(retrain_study, study, trial, unet, train, end, scores, device)
    write_last_checkpoint(options, trial.number, end)  # last: the run is recorded
    best_text = f" (best {best.iou:.3f} at epoch {best.epoch})" if best else ""
    print(f"  trial {trial.number}: IoU {record.iou:.3f} -> {last['val_iou']:.3f}{best_text}")
    return _row(trial.number, n_params, record.iou, last, end)


def _record_retrained(
    retrain_study: optuna.Study,
    study: optuna.Study,
    trial: FrozenTrial,
    unet: UNetConfig,
    train: TrainConfig,
    end: Checkpoint,
    scores: dict,
    device: torch.device,
) -> None:
    """The retrained member as a trial of `<study>-retrain`, labelled with the search trial it
    came from: its scores, the run's settings and costs, its best epoch, its curve."""
    from nas.search.record import TrialRecord, carried, study_objectives
    from nas.search.rerun import rerun_trial

    best = end.best
    attrs = carried(
        source_trial=trial.number,
        search_val_iou=TrialRecord.of(trial).iou,
        epochs_run=end.epoch,
        steps=end.steps,
        seconds=round(end.seconds, 2),
        unet_config=unet.to_dict(),
        train_config=dataclasses.asdict(train),
        device=str(device),
        best=best.scores() if best else None,
        train_loss=[row["train_loss"] for row in end.history],
    )
    curve = {row["epoch"]: row["val_iou"] for row in end.history}
    objectives = study_objectives(study).names
    retrain_study.add_trial(rerun_trial(trial, scores, objectives, attrs, curve))


def _row(
    trial_number: int, n_params: int, search_val_iou: float, last: dict, end: Checkpoint
) -> dict:
    """A retrained member's row of retrained.csv: the scores of its last epoch (`last`, or of
    the whole validation volumes), and of its best."""
    best = end.best
    return {
        "trial": trial_number,
        "n_params": n_params,
        "search_val_iou": search_val_iou,
        "retrained_val_iou": last["val_iou"],
        "retrained_val_dice": last["val_dice"],
        "best_val_iou": best.iou if best else None,
        "best_epoch": best.epoch if best else None,
        "epochs": end.epoch,
        "steps": end.steps,
        "seconds": round(end.seconds, 1),
    }


def epoch_validation(
    study: optuna.Study, val_cases: Sequence[Case], slicing: Slicing
) -> ValidationPlan:
    """How a retrain validates after each epoch: on the fixed patches its search validated
    on (what nnU-Net's online validation does, at a cost the patch count sets whatever the
    volumes' size), or on the whole cases where the study records no such patches. The
    whole cases are predicted once, at the end (`_retrain_one`)."""
    from nas.search.record import StudyRecord
    from nas.search.scoring import search_validation_cases
    from nas.training.fit import EVERY_EPOCH, ValidationPlan
    from nas.validation.validate import ValidationPatches

    recorded = StudyRecord.of(study).validation
    if not val_cases or not recorded or "seed" not in recorded:
        return EVERY_EPOCH
    cases = search_validation_cases(val_cases, recorded.get("cases"), recorded["seed"])
    patches = ValidationPatches(cases, recorded["patches_per_case"], recorded["seed"],
                                slicing.axis, recorded["foreground_fraction"])  # fmt: skip
    return ValidationPlan(None, patches)


def _final_scores(
    model: torch.nn.Module,
    last: dict,
    validation: ValidationPlan,
    val_cases: Sequence[Case],
    scheme: LabelScheme,
    patch_size: tuple[int, ...],
    device: torch.device,
    slicing: Slicing,
) -> dict:
    """The run's scores: its last epoch's (`last`, a checkpoint history row), or where the
    epochs validated on patches, those of the whole validation volumes, predicted now."""
    if validation.patches is None:
        return last
    from nas.validation.validate import evaluate

    whole = evaluate(model, val_cases, scheme, patch_size, device, slicing.axis)
    print(f"  whole validation volumes: IoU {whole.iou:.3f}, Dice {whole.dice:.3f}, "
          f"case Dice {whole.case_dice:.3f}")  # fmt: skip
    return {**last, "val_iou": whole.iou, "val_dice": whole.dice, "val_case_dice": whole.case_dice}


def _save_best(files: TrialFiles, trial_number: int, best: Best | None) -> None:
    """The best epoch's weights beside the final ones; none where no epoch scored (every IoU
    undefined), and then no earlier run's either."""
    import torch

    from nas.search.weights import best_path

    best_file = best_path(retrained_path(files.study_dir, trial_number))
    if best is not None:
        atomic_write(best_file, lambda tmp: torch.save(best.weights, tmp))
        files.publish(best_file)
    else:
        files.drop(best_file)
