"""`python -m nas.retrain results/<study>`: retrain chosen front members at the full budget.

The search trains each candidate briefly (a few epochs, a wall-clock budget, perhaps a few
slices per case). This command takes members of the Pareto front, trains them again with
more epochs, no time limit and every training slice, and records each result as a trial of
its own study, `<study>-retrain`, in the same storage, labelled with the trial it came from.
The search's own values are never touched. Weights go to results/<study>/retrained/: the
final ones, and those of the epoch with the best validation IoU (trial_NNNN.best.pt).

A retrain runs for --epochs of --batches-per-epoch steps (nnU-Net: 1000 of 250), prints a
line per epoch, and writes a checkpoint every --checkpoint-every epochs and at the end
(trial_NNNN.latest.pt, nas/training/resumable.py). After a crash or a kill, the same command with
--continue goes on from each member's checkpoint and ends with the steps of a run never
stopped; a checkpoint of another trial or of other settings is refused.

With `--all-cases`, each chosen member is trained once more on every training case, the
validation fold's too, for the epochs it reached in the search (or --epochs), with nothing
left to validate on: nnU-Net's fold "all", the model to ship once cross-validation has chosen.
Its weights go to results/<study>/retrained/all_cases/ and nas export takes them first.

With `--folds`, each chosen member is instead cross-validated (nas.evaluation.crossval): trained on
every fold, recorded in `<study>-crossval`, summarised as mean +- sd per member in
results/<study>/crossval.csv with the postprocessing the out-of-fold predictions chose; where
the dataset has held-out test cases, the fold ensemble with and without mirroring is scored
on them next to a single fold's model, with its inference time (results/<study>/ensemble.csv).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nas.commands.cli import (
    add_device_option,
    add_processes_option,
    command_parser,
    device_option,
    exit_code,
    pool_option,
    processes_option,
)
from nas.core.errors import NasError
from nas.core.staging import atomic_write
from nas.search.weights import (
    all_cases_dir,
    all_cases_path,
    latest_checkpoint_path,
    retrained_dir,
    retrained_path,
)

# Epochs between two checkpoints, unless --checkpoint-every says otherwise.
CHECKPOINT_EVERY = 10

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.data import Case, DataConfig, Dataset, Slicing
    from nas.data.labels import LabelScheme
    from nas.search.trial_files import TrialFiles
    from nas.training.fit import ValidationPlan
    from nas.training.resumable import Best, Checkpoint
    from nas.training.train_config import TrainConfig


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("retrain", __doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/unet")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--top", type=int, default=3, help="the K front members of highest IoU")
    choice.add_argument("--trials", help="comma-separated trial numbers, e.g. 3,15")
    parser.add_argument("--epochs", type=int, help="epochs (default: 3x the search's)")
    parser.add_argument(
        "--batches-per-epoch", type=int, metavar="B",
        help="optimiser steps per epoch (default: the search's)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-every", type=int, metavar="N",
        help=f"epochs between checkpoints (default {CHECKPOINT_EVERY}; one at the end as well)",
    )  # fmt: skip
    parser.add_argument(
        "--continue", dest="continue_run", action="store_true",
        help="go on from each member's last checkpoint to the end its run was started for",
    )  # fmt: skip
    parser.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")
    parser.add_argument(
        "--folds", help="cross-validate on these folds of the search's split: all, or e.g. 0,1"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="folds trained at once, in processes (--folds)"
    )
    parser.add_argument(
        "--all-cases", action="store_true",
        help="train the final model on every training case, none held for validation, for the "
        "epochs the search trained it (or --epochs)",
    )  # fmt: skip
    add_device_option(parser)
    add_processes_option(parser)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def parse_folds(text: str, data: DataConfig) -> list[int]:
    from nas.evaluation.crossval import all_folds

    available = all_folds(data)
    if text == "all":
        return available
    try:
        folds = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise NasError("--folds", f"give 'all' or fold numbers such as 0,1, not {text!r}") from None
    missing = [f for f in folds if f not in available]
    if missing:
        raise NasError(
            "--folds", f"fold {missing[0]} does not exist (the split has folds 0-{available[-1]})"
        )
    return folds


def run_crossval(
    args: argparse.Namespace,
    study: optuna.Study,
    chosen: list[FrozenTrial],
    data_cfg: DataConfig,
    storage: str,
    device: torch.device,
) -> int:
    import pandas as pd

    from nas.commands.report import write_report
    from nas.data import load_dataset
    from nas.data.test_split import find_test_split
    from nas.evaluation.crossval import cross_validate, record_ensemble
    from nas.evaluation.heldout import compare_ensemble
    from nas.search.companions import open_crossval_study, summary_rows
    from nas.search.record import StudyRecord, study_objectives
    from nas.search.storage import open_storage, redact
    from nas.search.weights import fold_path

    folds = parse_folds(args.folds, data_cfg)
    objectives = study_objectives(study).names
    crossval = open_crossval_study(
        open_storage(storage, access="existing"), study.study_name, objectives
    )
    cross_validate(study, chosen, folds, args.results, crossval, args.epochs, device, args.workers)
    table = pd.DataFrame(summary_rows(crossval, study))
    atomic_write(args.results / "crossval.csv", lambda p: table.to_csv(p, index=False))
    for row in table.itertuples():
        sd = "" if pd.isna(row.cv_iou_sd) else f" +- {row.cv_iou_sd:.4f}"
        print(
            f"trial {row.trial}: IoU {row.cv_iou_mean:.4f}{sd} over folds {row.folds} "
            f"(search: {row.search_val_iou:.4f}); largest component: "
            f"{row.largest_component or 'not applied'}"
        )
    chosen_ensemble = _choose_member_ensemble(args, study, crossval, table, folds, device)
    dataset = load_dataset(data_cfg)
    split = find_test_split(data_cfg, dataset)
    if split is not None and len(folds) > 1:
        postprocessing = StudyRecord.of(crossval).postprocessing
        rows = []
        for trial in chosen:
            weights = {f"fold_{f}": args.files.local(fold_path(args.results, trial.number, f))
                       for f in folds}  # fmt: skip
            single = f"fold_{data_cfg.fold if data_cfg.fold in folds else folds[0]}"
            compared = compare_ensemble(
                study, trial, weights, single, split, device,
                postprocessing.get(str(trial.number), []),
            )  # fmt: skip
            record_ensemble(crossval, trial.number, compared)
            rows += compared
        if chosen_ensemble is not None and chosen_ensemble["n_members"] > 1:
            rows.append(_score_member_ensemble(study, args.results, chosen_ensemble, split, device))
            record_ensemble(crossval, -1, rows[-1:])
        ensemble = pd.DataFrame(rows)
        atomic_write(args.results / "ensemble.csv", lambda p: ensemble.to_csv(p, index=False))
        print(ensemble.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    report = write_report(study, args.results)
    print(
        f"recorded in study {crossval.study_name!r} of {redact(storage)}, "
        f"{args.results}/crossval.csv and {report}"
    )
    return 0


def _retrain_study(study: optuna.Study, storage: str) -> optuna.Study:
    """`<study>-retrain` in the search's storage, with the search's objectives."""
    from nas.search.companions import open_retrain_study
    from nas.search.record import study_objectives
    from nas.search.storage import open_storage

    return open_retrain_study(
        open_storage(storage, access="existing"), study.study_name, study_objectives(study).names
    )


def run_all_cases(
    args: argparse.Namespace,
    study: optuna.Study,
    chosen: list[FrozenTrial],
    data_cfg: DataConfig,
    storage: str,
    device: torch.device,
) -> int:
    from nas.data import load_dataset
    from nas.search.record import merge_study
    from nas.search.results import save_checkpoint
    from nas.search.storage import redact
    from nas.training.fit import CandidateFailed
    from nas.training.resumable import write_checkpoint

    dataset = load_dataset(data_cfg)
    retrain_study = _retrain_study(study, storage)
    failed = 0
    for trial in chosen:
        plan = _run_plan(args, study, trial, data_cfg)
        train = plan[0]
        print(f"training trial {trial.number} on all {len(dataset.cases)} cases for "
              f"{train.epochs} epochs of {train.batches_per_epoch} batches "
              "(nothing to validate on: final weights only)")  # fmt: skip
        try:
            trained = _train_member(args, trial, plan, (dataset.cases, ()), dataset, data_cfg,
                                    device)  # fmt: skip
        except CandidateFailed as failure:
            print(f"  trial {trial.number}: failed ({failure.reason})")
            failed += 1
            continue
        if trained is None:
            continue
        model, end = trained
        path = save_checkpoint(all_cases_dir(args.results), trial.number, model.state_dict())
        args.files.publish(path)
        recorded = {
            "epochs_run": end.epoch,
            "steps": end.steps,
            "cases": len(dataset.cases),
            "seconds": round(end.seconds, 2),
            "train_loss": end.history[-1]["train_loss"],
            "device": str(device),
        }
        merge_study(retrain_study, "all_cases", {str(trial.number): recorded})
        write_checkpoint(_latest_path(args, trial.number), end)  # last: the run is recorded
        args.files.publish(_latest_path(args, trial.number))
        print(f"  trial {trial.number}: {path} (final training loss "
              f"{recorded['train_loss']:.4f})")  # fmt: skip
    print(f"recorded in study {retrain_study.study_name!r} of {redact(storage)}")
    return 1 if failed == len(chosen) else 0


def _choose_member_ensemble(
    args: argparse.Namespace,
    study: optuna.Study,
    crossval: optuna.Study,
    table,
    folds: list[int],
    device: torch.device,
) -> dict | None:
    """With two or more members cross-validated on every fold asked for: each member alone
    and the ensembles of the best 2 and 3, scored out of fold, the best chosen
    (results/<study>/member_ensembles.csv, and the crossval study for nas export)."""
    import pandas as pd

    from nas.evaluation.member_ensemble import record, score_out_of_fold

    complete = [r for r in table.itertuples() if len(str(r.folds).split()) == len(folds)]
    if len(complete) < 2 or len(folds) < 2:
        return None
    ranked = [r.trial for r in sorted(complete, key=lambda r: -r.cv_iou_mean)]
    rows, chosen = score_out_of_fold(study, ranked, folds, args.results, device)
    record(crossval, rows, chosen)
    frame = pd.DataFrame(rows)
    atomic_write(args.results / "member_ensembles.csv", lambda p: frame.to_csv(p, index=False))
    print("out of fold, members and their ensembles:")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    how = "alone" if chosen["n_members"] == 1 else "(nas export --ensemble members)"
    print(f"chosen: {chosen['members']} {how}")
    return chosen


def _score_member_ensemble(
    study: optuna.Study, results: Path, chosen: dict, split, device: torch.device
) -> dict:
    """The chosen ensemble of different members on the held-out cases, exported and
    predicted as a user would (each member with the weights nas export takes by default)."""
    import tempfile

    from nas.deploy.export import export_members
    from nas.evaluation.heldout import score_member_ensemble
    from nas.evaluation.member_ensemble import chosen_trials

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    trials = [by_number[n] for n in chosen_trials(chosen)]
    with tempfile.TemporaryDirectory(prefix="nas-members-") as scratch:
        folder = Path(scratch) / "ensemble"
        export_members(study, results, trials, folder, (), "", "folds", False, "none",
                       chosen["largest_component"].split())  # fmt: skip
        scores = score_member_ensemble(folder, split, device)
    return {"trial": chosen["members"], "variant": "members' fold ensembles", **scores}


def choose_trials(study: optuna.Study, top: int, numbers: str | None) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    from nas.search.record import TrialRecord
    from nas.search.results import pareto_front

    if numbers is None:
        front = pareto_front(study)
        if not front:
            raise NasError(study.study_name, "has no completed trial to retrain")
        return sorted(front, key=lambda t: -(TrialRecord.of(t).iou or 0.0))[:top]
    by_number = {t.number: t for t in study.trials}
    chosen = []
    for text in numbers.split(","):
        try:
            trial = by_number[int(text)]
        except (ValueError, KeyError):
            raise NasError(
                "--trials", f"study {study.study_name!r} has no trial {text!r}"
            ) from None
        if trial.state != TrialState.COMPLETE:
            raise NasError("--trials", f"trial {trial.number} is {trial.state.name}, not COMPLETE")
        chosen.append(trial)
    return chosen


def run(args: argparse.Namespace) -> int:
    from nas.data import DataConfig, load_dataset
    from nas.search.record import StudyRecord
    from nas.search.study import default_storage, load_results_study
    from nas.search.trial_files import trial_files

    processes = processes_option(args.processes)
    pool_option("--workers", args.workers)  # folds trained at once
    storage = args.storage or default_storage(args.results)
    # Its companion studies are written into the search's storage: only one that holds it.
    study = load_results_study(args.results, args.storage, access="existing")
    name = study.study_name
    # What this command trains and reads, shared through the study's artifact store when
    # it has one: every function below writes and finds the trial files through it.
    args.files = trial_files(study, args.results)
    recorded = StudyRecord.of(study).data_config
    if recorded is None:
        raise NasError(storage, f"study {name!r} does not record its data settings")
    data_cfg = DataConfig(**recorded)
    if args.all_cases and args.folds is not None:
        raise NasError("--all-cases", "trains one model on every case; --folds one per fold")
    for option in ("epochs", "batches_per_epoch", "checkpoint_every", "top"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise NasError(f"--{option.replace('_', '-')}", f"must be at least 1, not {value}")
    if args.folds is not None:
        _refuse_with_folds(args)
    chosen = choose_trials(study, args.top, args.trials)
    if args.folds is None:  # every member's settings and checkpoint checked before training
        for trial in chosen:
            _run_plan(args, study, trial, data_cfg)
    load_dataset(data_cfg, processes=processes)  # built here if another machine searched
    device = device_option(args.device)  # torch: once the trials are found
    if args.folds is not None:
        return run_crossval(args, study, chosen, data_cfg, storage, device)
    try:
        if args.all_cases:
            return run_all_cases(args, study, chosen, data_cfg, storage, device)
        return run_retrain(args, study, chosen, data_cfg, storage, device)
    except KeyboardInterrupt:  # Ctrl-C: the same command afresh would start over
        print("interrupted: the same command with --continue goes on from each member's "
              "last checkpoint", file=sys.stderr)  # fmt: skip
        return 130


def _refuse_with_folds(args: argparse.Namespace) -> None:
    given = {
        "--batches-per-epoch": args.batches_per_epoch is not None,
        "--checkpoint-every": args.checkpoint_every is not None,
        "--continue": args.continue_run,
    }
    for option, is_given in given.items():
        if is_given:
            raise NasError(
                option,
                "applies to nas retrain and --all-cases, not to --folds (which continues by "
                "itself: a fold already recorded is not trained again)",
            )


def _run_plan(
    args: argparse.Namespace, study: optuna.Study, trial: FrozenTrial, data_cfg: DataConfig
) -> tuple[TrainConfig, dict, Checkpoint | None]:
    """How `trial` is trained: its TrainConfig (the search's, for the run's epochs and
    batches per epoch, with no time limit), the run's identity, and with --continue the
    checkpoint it goes on from, checked to belong to that run (the epochs, batches per epoch
    and checkpoint interval not given are the checkpoint's)."""
    from pydantic import ValidationError

    from nas.search.record import TrialRecord
    from nas.training.resumable import check_identity, read_checkpoint

    record = TrialRecord.of(trial)
    search_train = record.train()
    path = _latest_path(args, trial.number)
    start, recorded = None, {}
    if args.continue_run:
        if args.files.local(path) is None:  # written here, or by another host of the study
            raise NasError(
                "--continue",
                f"trial {trial.number} has no checkpoint to continue ({path}); "
                "retrain it without --continue",
            )
        start = read_checkpoint(path)
        recorded = start.identity
    if args.all_cases:
        default_epochs = record.epochs_run or search_train.epochs
    else:
        default_epochs = 3 * search_train.epochs
    epochs = args.epochs or recorded.get("epochs") or default_epochs
    batches = (
        args.batches_per_epoch
        or recorded.get("batches_per_epoch")
        or search_train.batches_per_epoch
    )
    try:
        train = dataclasses.replace(
            search_train, epochs=epochs, batches_per_epoch=batches, max_seconds=None
        )
    except ValidationError as err:  # beyond TrainConfig's bounds
        problem = err.errors()[0]
        raise NasError(f"--{str(problem['loc'][0]).replace('_', '-')}", problem["msg"]) from None
    identity = {
        "study": study.study_name,
        "trial": trial.number,
        "all_cases": bool(args.all_cases),
        "fold": None if args.all_cases else data_cfg.fold,
        "seed": train.seed,
        "epochs": epochs,
        "batches_per_epoch": batches,
        "checkpoint_every": (
            args.checkpoint_every or recorded.get("checkpoint_every") or CHECKPOINT_EVERY
        ),
    }
    if start is not None:
        check_identity(path, start.identity, identity)
    return train, identity, start


def _latest_path(args: argparse.Namespace, trial_number: int) -> Path:
    """The checkpoint of a member's retrain (with --all-cases, of its all-cases training)."""
    final = all_cases_path if args.all_cases else retrained_path
    return latest_checkpoint_path(final(args.results, trial_number))


def _train_member(
    args: argparse.Namespace,
    trial: FrozenTrial,
    plan: tuple[TrainConfig, dict, Checkpoint | None],
    cases: tuple[Sequence[Case], Sequence[Case]],
    dataset: Dataset,
    data_cfg: DataConfig,
    device: torch.device,
    validation: ValidationPlan | None = None,
) -> tuple[torch.nn.Module, Checkpoint] | None:
    """Train one member as `plan` (`_run_plan`) says, from scratch or from its checkpoint,
    writing checkpoints as it goes: the network and the run's last checkpoint (for the
    caller to write once the run's results are saved). None: its run had finished. Raises
    CandidateFailed as `fit` does."""
    from nas.core.staging import remove_stale_staging
    from nas.search.record import TrialRecord
    from nas.training.fit import EVERY_EPOCH
    from nas.training.resumable import train_resumable
    from nas.training.start import starting_model

    train, identity, start = plan
    path = _latest_path(args, trial.number)
    if start is not None and start.finished:
        print(f"  its run finished ({start.epoch} epochs): nothing to continue")
        return None
    remove_stale_staging(path.parent)  # what a killed run was writing
    unet = TrialRecord.of(trial).unet()
    if start is not None:
        print(f"  continuing from the checkpoint at epoch {start.epoch} ({start.steps:,} steps)")
    else:
        args.files.drop(path)  # a fresh run: no checkpoint of an earlier one is continued
    model = starting_model(unet, train, resumed=start is not None)  # start's weights go in
    # Every training slice: the search may have used a few per case.
    slicing = dataclasses.replace(data_cfg.slicing, per_case=None)
    say = functools.partial(print, flush=True)  # a line per epoch, at once even into a log
    end = train_resumable(model, *cases, dataset.scheme, train, device, slicing,
                          path, identity, start, say,
                          validation or EVERY_EPOCH, args.files.publish)  # fmt: skip
    return model, end


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


def run_retrain(
    args: argparse.Namespace,
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
    retrain_study = _retrain_study(study, storage)
    rows = []
    for trial in chosen:
        row = _retrain_one(args, study, retrain_study, trial, dataset, (train_cases, val_cases),
                           data_cfg, device)  # fmt: skip
        if row is not None:
            rows.append(row)
    if not rows:  # each failed or had finished: the last table stands
        print(f"recorded in study {retrain_study.study_name!r} of {redact(storage)}")
        return 0
    table = pd.DataFrame(rows)
    atomic_write(args.results / "retrained.csv", lambda p: table.to_csv(p, index=False))
    print(
        f"recorded in study {retrain_study.study_name!r} of {redact(storage)} "
        f"and {args.results}/retrained.csv"
    )
    return 0


def _retrain_one(
    args: argparse.Namespace,
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
    from nas.search.record import TrialRecord, carried, study_objectives
    from nas.search.rerun import rerun_trial
    from nas.search.results import save_checkpoint
    from nas.training.fit import CandidateFailed, init_model
    from nas.training.resumable import write_checkpoint

    record = TrialRecord.of(trial)
    unet = record.unet()
    plan = _run_plan(args, study, trial, data_cfg)
    train = plan[0]
    # Every training slice: the search may have used a few per case.
    slicing = dataclasses.replace(data_cfg.slicing, per_case=None)
    validation = epoch_validation(study, cases[1], slicing)
    n_params = count_parameters(init_model(unet, train.seed))
    print(f"retraining trial {trial.number} ({n_params:,} params) for {train.epochs} epochs "
          f"of {train.batches_per_epoch} batches")  # fmt: skip
    try:
        trained = _train_member(args, trial, plan, cases, dataset, data_cfg, device, validation)
    except CandidateFailed as failure:  # as nas.run: the trial fails, the others go on
        attrs = carried(source_trial=trial.number, fail_reason=failure.reason)
        retrain_study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=attrs))
        print(f"  trial {trial.number}: failed ({failure.reason})")
        return None
    if trained is None:
        return None
    model, end = trained
    best = end.best
    _save_best(args.files, trial.number, best)
    args.files.publish(save_checkpoint(retrained_dir(args.results), trial.number,
                                       model.state_dict()))  # fmt: skip
    last = _final_scores(model, end.history[-1], validation, cases[1], dataset.scheme,
                         train.patch_size(unet.spatial_dims), device, slicing)  # fmt: skip
    scores = {"iou": last["val_iou"], "dice": last["val_dice"],
              "case_dice": last.get("val_case_dice"), "params": n_params}  # fmt: skip
    attrs = carried(
        source_trial=trial.number,
        search_val_iou=record.iou,
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
    write_checkpoint(_latest_path(args, trial.number), end)  # last: the run is recorded
    args.files.publish(_latest_path(args, trial.number))
    best_text = f" (best {best.iou:.3f} at epoch {best.epoch})" if best else ""
    print(f"  trial {trial.number}: IoU {record.iou:.3f} -> {last['val_iou']:.3f}{best_text}")
    return {
        "trial": trial.number,
        "n_params": n_params,
        "search_val_iou": record.iou,
        "retrained_val_iou": last["val_iou"],
        "retrained_val_dice": last["val_dice"],
        "best_val_iou": best.iou if best else None,
        "best_epoch": best.epoch if best else None,
        "epochs": end.epoch,
        "steps": end.steps,
        "seconds": round(end.seconds, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
