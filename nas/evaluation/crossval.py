"""Cross-validation of chosen front members: train each on every fold, out-of-fold checks.

The search selects on one validation fold, so its scores are optimistic. Here each member is
trained again on each fold of the dataset's k-fold split (the folds the search's data config
defines, or its splits file), with the same training settings. A fold's run is one trial of
the study `<study>-crossval` in the search's storage, labelled with the member and the fold;
its weights go to results/<study>/crossval/trial_NNNN/fold_K.pt. A run already recorded with
the same epochs is not trained again, so an interrupted cross-validation continues where it
stopped. The out-of-fold predictions decide the postprocessing as nnU-Net does: a class keeps
only its largest connected component when that raises its mean Dice over all cases. The
search's own trials are never touched.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState, create_trial

from nas.core.staging import atomic_write
from nas.data import DataConfig, load_dataset, split_dataset
from nas.data.sampling import read_splits
from nas.network.builder import UNetConfig, count_parameters
from nas.network.device import flush_denormals
from nas.network.windows import predict_case
from nas.search.companions import member_runs
from nas.search.record import StudyRecord, TrialRecord, carried, merge_study
from nas.search.rerun import rerun_trial
from nas.search.trial_files import trial_files
from nas.search.weights import fold_path
from nas.training.fit import CandidateFailed, TrainConfig, fit
from nas.training.start import starting_model
from nas.validation.postprocess import classes_helped, dice_per_class, keep_largest_component


def all_folds(data: DataConfig) -> list[int]:
    """The folds of the search's split: n_folds, or the entries of its splits file."""
    if data.splits_file is None:
        return list(range(data.n_folds))
    return list(range(len(read_splits(data.splits_file))))


@dataclass(frozen=True)
class FoldJob:
    """One member trained on one fold: everything a worker process needs, as plain data."""

    trial: int
    fold: int
    unet: dict
    train: dict
    data: dict
    weights: str
    device: str
    threads: int


def run_fold(job: FoldJob) -> dict:
    """Train `job`'s member on its fold, save the weights, and score the fold's validation
    cases one by one without and with the largest-component postprocessing. A member that
    cannot be trained (out of memory, diverging) gives {"fail_reason": ...}."""
    device = torch.device(job.device)
    flush_denormals(device)  # a fresh process: before anything runs on the CPU
    if job.threads:
        torch.set_num_threads(job.threads)
    data = DataConfig(**{**job.data, "fold": job.fold})
    dataset = load_dataset(data)
    train_cases, val_cases = split_dataset(dataset, data)
    unet = UNetConfig.from_dict(job.unet)
    train = TrainConfig(**job.train)
    slicing = dataclasses.replace(data.slicing, per_case=None)  # every training slice
    try:
        model = starting_model(unet, train)
        result = fit(model, train_cases, val_cases, dataset.scheme, train, device, None, slicing)
    except CandidateFailed as failure:
        return {"fail_reason": failure.reason}
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    atomic_write(Path(job.weights), lambda tmp: torch.save(state, tmp))
    model.eval()
    patch = train.patch_size(unet.spatial_dims)
    classes = range(1, dataset.n_classes + 1)
    out_of_fold = []
    for case in val_cases:
        prediction = predict_case(model, case, dataset.scheme, patch, device, data.slice_axis)
        largest = keep_largest_component(prediction, classes)
        label = np.asarray(case.label)
        out_of_fold.append(
            {
                "case": case.name,
                "dice": dice_per_class(prediction, label, dataset.n_classes),
                "dice_largest": dice_per_class(largest, label, dataset.n_classes),
            }
        )
    return {
        "iou": result.scores.iou,
        "dice": result.scores.dice,
        "case_dice": result.scores.case_dice,
        "n_params": count_parameters(model),
        "curve": {e.epoch: e.scores.iou for e in result.history},
        "seconds": result.seconds,
        "epochs_run": len(result.history),
        "out_of_fold": out_of_fold,
        "class_names": list(dataset.class_names),
    }


def done_runs(study: optuna.Study, epochs: int) -> dict[tuple[int, int], FrozenTrial]:
    """{(member, fold): trial} of the runs already recorded with `epochs`."""
    runs = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        record = TrialRecord.of(t)
        if record.epochs == epochs:
            runs[(record.source_trial, record.fold)] = t
    return runs


def cross_validate(
    search: optuna.Study,
    members: Sequence[FrozenTrial],
    folds: Sequence[int],
    study_dir: Path,
    crossval: optuna.Study,
    epochs: int | None,
    device: torch.device,
    workers: int = 1,
) -> None:
    """Train each member on each fold not yet recorded in `crossval`, `workers` at a time,
    and record every run there as it ends."""
    data = StudyRecord.of(search).data_config
    dataset = load_dataset(DataConfig(**data))
    for fold in folds:  # a fold that cannot be validated is refused before any training
        split_dataset(dataset, DataConfig(**{**data, "fold": fold}))
    objectives = StudyRecord.of(crossval).objectives
    files = trial_files(search, study_dir)  # folds another host trained are fetched
    jobs, by_number = [], {}
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    for member in members:
        record = TrialRecord.of(member)
        train = record.train()
        train = dataclasses.replace(train, epochs=epochs or 3 * train.epochs, max_seconds=None)
        done = done_runs(crossval, train.epochs)
        by_number[member.number] = member
        for fold in folds:
            path = fold_path(study_dir, member.number, fold)
            if (member.number, fold) in done and files.local(path) is not None:
                continue
            jobs.append(
                FoldJob(
                    member.number,
                    fold,
                    record.unet_config,
                    dataclasses.asdict(train),
                    data,
                    str(path),
                    str(device),
                    threads,
                )
            )
    for job in jobs:
        print(f"trial {job.trial} fold {job.fold}: training {job.train['epochs']} epochs")

    def record(job: FoldJob, outcome: dict) -> None:
        if "fail_reason" not in outcome:  # for every host of the study
            files.publish(Path(job.weights))
        _record_run(crossval, objectives, by_number[job.trial], job, outcome)

    if workers <= 1:
        for job in jobs:
            record(job, run_fold(job))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for job, outcome in zip(jobs, pool.map(run_fold, jobs), strict=True):
                record(job, outcome)
    choose_postprocessing(crossval, [m.number for m in members])


def _record_run(
    crossval: optuna.Study,
    objectives: Sequence[str],
    member: FrozenTrial,
    job: FoldJob,
    outcome: dict,
) -> None:
    """Add one fold's run to `crossval` as it ends: a finished trial with its scores, or a
    failed one (recorded so the report can say so; trained again next time)."""
    if "fail_reason" in outcome:
        crossval.add_trial(
            create_trial(
                state=TrialState.FAIL,
                user_attrs=carried(source_trial=job.trial, fold=job.fold, **outcome),
            )
        )
        print(f"trial {job.trial} fold {job.fold}: failed ({outcome['fail_reason']})")
        return
    scores = {"iou": outcome["iou"], "dice": outcome["dice"], "params": outcome["n_params"],
              "case_dice": outcome["case_dice"]}  # fmt: skip
    attrs = carried(
        source_trial=job.trial,
        fold=job.fold,
        epochs_run=outcome["epochs_run"],
        seconds=round(outcome["seconds"], 2),
        unet_config=job.unet,
        train_config=job.train,
        out_of_fold=outcome["out_of_fold"],
        class_names=outcome["class_names"],
        device=job.device,
    )
    crossval.add_trial(rerun_trial(member, scores, objectives, attrs, outcome["curve"]))
    print(f"trial {job.trial} fold {job.fold}: IoU {outcome['iou']:.4f}")


def choose_postprocessing(crossval: optuna.Study, trial_numbers: Sequence[int]) -> None:
    """Store, per member, the classes whose out-of-fold mean Dice the largest component
    raises (nnU-Net's rule)."""
    chosen = {}
    for number in trial_numbers:
        runs = member_runs(crossval, number)
        cases = [case for run in runs for case in TrialRecord.of(run).out_of_fold]
        if not cases:
            continue
        names = TrialRecord.of(runs[0]).class_names
        helped = classes_helped([c["dice"] for c in cases], [c["dice_largest"] for c in cases])
        chosen[str(number)] = [names[k - 1] for k in helped]
    merge_study(crossval, "postprocessing", chosen)


def record_ensemble(crossval: optuna.Study, trial_number: int, rows: list[dict]) -> None:
    """Keep a member's held-out single vs ensemble comparison in the storage, for the report."""
    merge_study(crossval, "heldout_ensemble", {str(trial_number): rows})
