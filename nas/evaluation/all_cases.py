"""Each chosen member trained once more on every training case, the validation fold's too, for
the epochs it reached in the search (or --epochs), with nothing left to validate on: nnU-Net's
fold "all", the model to ship once cross-validation has chosen. Checkpointed and continued as
any retrain (nas.evaluation.retrain_plan); the weights go to results/<study>/retrained/all_cases/
(nas export takes them first) and the run is recorded on `<study>-retrain` (`all_cases`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nas.evaluation.retrain_plan import (
    RetrainOptions,
    retrain_study_of,
    run_plan,
    train_member,
    write_last_checkpoint,
)
from nas.search.weights import all_cases_dir

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.data import DataConfig


def run_all_cases(
    options: RetrainOptions,
    study: optuna.Study,
    chosen: list[FrozenTrial],
    data_cfg: DataConfig,
    storage: str,
    device: torch.device,
) -> int:
    """Train each chosen member on every case, saving its weights and recording the run;
    the exit code: 1 where every member failed."""
    from nas.data import load_dataset
    from nas.search.record import merge_study
    from nas.search.storage import redact
    from nas.search.weights import save_checkpoint
    from nas.training.fit import CandidateFailed

    dataset = load_dataset(data_cfg)
    retrain_study = retrain_study_of(study, storage)
    failed = 0
    for trial in chosen:
        plan = run_plan(options, study, trial, data_cfg)
        train = plan[0]
        print(f"training trial {trial.number} on all {len(dataset.cases)} cases for "
              f"{train.epochs} epochs of {train.batches_per_epoch} batches "
              "(nothing to validate on: final weights only)")  # fmt: skip
        try:
            trained = train_member(options, trial, plan, (dataset.cases, ()), dataset, data_cfg,
                                    device)  # fmt: skip
        except CandidateFailed as failure:
            print(f"  trial {trial.number}: failed ({failure.reason})")
            failed += 1
            continue
        if trained is None:
            continue
        model, end = trained
        path = save_checkpoint(all_cases_dir(options.results), trial.number, model.state_dict())
        options.files.publish(path)
        recorded = {
            "epochs_run": end.epoch,
            "steps": end.steps,
            "cases": len(dataset.cases),
            "seconds": round(end.seconds, 2),
            "train_loss": end.history[-1]["train_loss"],
            "device": str(device),
        }
        merge_study(retrain_study, "all_cases", {str(trial.number): recorded})
        write_last_checkpoint(options, trial.number, end)  # last: the run is recorded
        print(f"  trial {trial.number}: {path} (final training loss "
              f"{recorded['train_loss']:.4f})")  # fmt: skip
    print(f"recorded in study {retrain_study.study_name!r} of {redact(storage)}")
    return 1 if failed == len(chosen) else 0
