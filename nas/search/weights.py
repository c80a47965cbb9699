"""A trial's weight files: where nas keeps them, writing and dropping them, and which of them
an export takes.

Four commands train a search's trial and keep its weights under results/<study>/: the
search itself, for the members of its front (checkpoints/trial_NNNN.pt); nas.retrain, which
trains chosen trials again at full budget (retrained/checkpoints/trial_NNNN.pt, and the
weights of its best validation epoch beside them, trial_NNNN.best.pt);
nas.retrain --all-cases, the final model on every training case, validation fold included
(retrained/all_cases/checkpoints/trial_NNNN.pt, nnU-Net's fold "all"); and nas.retrain --folds, one
model per fold of the split (crossval/trial_NNNN/fold_K.pt). An export takes, unless told
which, the all-cases model (trained on the most data, by a deliberate request), then the
retrained weights, then the search's, then the folds' ensemble (a single network first: an
ensemble costs one pass per fold); the best retrained weights only when asked for. Beside
the weights nas.retrain trains, trial_NNNN.latest.pt is the checkpoint its --continue goes
on from (nas/training/resumable.py). Beside a search's weights, trial_NNNN.state.pt holds the
rest of its training state (optimizer, epoch) while the search may still promote it; the
search drops both once it cannot (`drop_weights`). Torch is imported only to write or read
a file, and Optuna only to read the storage's records, so a trial without weights is refused
before torch loads. A study many hosts share keeps these files in its artifact store too
(nas/search/trial_files.py): a finder fetches what another host trained.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.core.errors import NasError

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from nas.search.candidate_state import TrainingState
    from nas.search.trial_files import TrialFiles

# The kinds of weights, in the order an export prefers them.
KINDS = ("all-cases", "retrained", "search", "folds")
# Taken only when asked for: nas.retrain's weights at their best validation epoch.
RETRAINED_BEST = "retrained-best"


# What `trial_name` and `fold_name` give, recognised again in an ensemble export's folder.
TRIAL_NAME = re.compile(r"^trial_\d{4,}$")
FOLD_NAME = re.compile(r"^fold_\d+$")


def trial_name(trial_number: int) -> str:
    """How every file and folder of one trial is named: trial_0007."""
    return f"trial_{trial_number:04d}"


def is_trial_name(name: str) -> bool:
    """Whether `name` is one `trial_name` gives (four digits or more): how an ensemble
    export tells its member folders from anything else in its folder."""
    return TRIAL_NAME.match(name) is not None


def fold_name(fold: int) -> str:
    """How a fold's weights and a fold ensemble's member folder are named: fold_2."""
    return f"fold_{fold}"


def is_fold_name(name: str) -> bool:
    """Whether `name` is one `fold_name` gives: how a fold ensemble's export tells its member
    folders from anything else in its folder."""
    return FOLD_NAME.match(name) is not None


def checkpoint_path(study_dir: Path, trial_number: int) -> Path:
    """The search's weights of a trial (`study_dir`: the results folder)."""
    return study_dir / "checkpoints" / f"{trial_name(trial_number)}.pt"


def retrained_dir(study_dir: Path) -> Path:
    """Where nas.retrain keeps what it trains, laid out as a results folder."""
    return study_dir / "retrained"


def retrained_path(study_dir: Path, trial_number: int) -> Path:
    """nas.retrain's weights of a trial."""
    return checkpoint_path(retrained_dir(study_dir), trial_number)


def best_path(weights: Path) -> Path:
    """The weights of the best validation epoch, beside a run's final `weights`."""
    return weights.with_suffix(".best.pt")


def latest_checkpoint_path(weights: Path) -> Path:
    """The checkpoint a run continues from (weights, optimizer, epoch, best so far, the
    run's identity), beside the final `weights` the run will write."""
    return weights.with_suffix(".latest.pt")


def all_cases_dir(study_dir: Path) -> Path:
    """Where nas.retrain --all-cases keeps its final models, laid out as a results folder."""
    return retrained_dir(study_dir) / "all_cases"


def all_cases_path(study_dir: Path, trial_number: int) -> Path:
    """nas.retrain --all-cases's weights of a trial."""
    return checkpoint_path(all_cases_dir(study_dir), trial_number)


def folds_folder(study_dir: Path, trial_number: int) -> Path:
    return study_dir / "crossval" / trial_name(trial_number)


def fold_path(study_dir: Path, trial_number: int, fold: int) -> Path:
    """nas.retrain --folds's weights of a trial trained on one fold."""
    return folds_folder(study_dir, trial_number) / f"{fold_name(fold)}.pt"


def state_path(weights: Path) -> Path:
    """Where the rest of a checkpoint's training state (optimizer, epoch) is kept while its
    candidate may still be promoted."""
    return weights.with_name(weights.name.removesuffix(".pt") + ".state.pt")


def save_checkpoint(study_dir: Path, trial_number: int, state_dict: dict) -> Path:
    """A trial's weights at `checkpoint_path` under `study_dir` (renamed into place)."""
    import torch

    from nas.core.staging import atomic_write

    path = checkpoint_path(study_dir, trial_number)
    atomic_write(path, lambda tmp: torch.save(state_dict, tmp))
    return path


def save_state(weights: Path, state: TrainingState) -> None:
    """The optimizer state and epoch beside already saved weights (renamed into place)."""
    import torch

    from nas.core.staging import atomic_write

    payload = {"epoch": state.epoch, "optimizer": state.optimizer}
    atomic_write(state_path(weights), lambda tmp: torch.save(payload, tmp))


def load_state(weights: Path, device: torch.device) -> TrainingState:
    """The state saved by `save_state` with the weights it belongs to; OSError or
    RuntimeError when either file is missing or unreadable."""
    import torch

    from nas.search.candidate_state import TrainingState

    tensors = torch.load(weights, map_location=device, weights_only=True)
    payload = torch.load(state_path(weights), map_location=device, weights_only=True)
    return TrainingState(int(payload["epoch"]), tensors, payload["optimizer"])


def drop_weights(
    files: TrialFiles,
    trials: Sequence[FrozenTrial],
    on_front: Container[int],
    may_continue: Callable[[FrozenTrial], bool],
) -> None:
    """Drop, here and from the study's shared artifact store, the search's training state of
    every finished trial that may not continue (`may_continue`), and its weights too where it
    is off the front (`on_front`: trial numbers); a trial still running keeps both."""
    uploaded = files.records()  # one read for every file dropped
    for trial in trials:
        if not trial.state.is_finished():
            continue
        weights = checkpoint_path(files.study_dir, trial.number)
        if not may_continue(trial):
            files.drop(state_path(weights), uploaded)
            if trial.number not in on_front:
                files.drop(weights, uploaded)


@dataclass(frozen=True)
class TrialWeights:
    """The weights of one trial an export takes: one file, or one per fold."""

    kind: str  # one of KINDS
    path: Path  # the file, or the folds' folder
    members: dict[str, Path]  # {"": file} for one network, {"fold_K": file} for the folds
    # What training these weights recorded: epochs_run, val_iou, val_dice (folds: means).
    scores: dict[str, Any]

    @property
    def files(self) -> Path | dict[str, Path]:
        """As nas.deploy.export.export takes them: one file, or the members by name."""
        return self.members[""] if "" in self.members else dict(self.members)

    def describe(self, study_dir: Path) -> dict[str, Any]:
        """For architecture.yaml's source.weights: the kind, the path relative to the
        results folder, and the scores these weights were trained to."""
        try:
            path = self.path.relative_to(study_dir)
        except ValueError:
            path = self.path
        return {"kind": self.kind, "path": path.as_posix(), **self.scores}


def _scores(trial: FrozenTrial) -> dict[str, Any]:
    from nas.search.record import TrialRecord

    record = TrialRecord.of(trial)
    return {
        "epochs_run": record.epochs_run,
        "val_iou": record.iou,
        "val_dice": record.quantity("dice"),
    }


def _search(study: optuna.Study, files: TrialFiles, trial: FrozenTrial) -> TrialWeights | None:
    path = checkpoint_path(files.study_dir, trial.number)
    if files.local(path) is None:
        return None
    return TrialWeights("search", path, {"": path}, _scores(trial))


def _latest_retrain(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial | None:
    """The latest retrain of `trial` that finished: the one whose weights the files hold."""
    from nas.search.companions import completed_runs, find_retrain_study

    retrain = find_retrain_study(study)
    runs = completed_runs(retrain, trial.number) if retrain is not None else []
    return runs[-1] if runs else None


def _retrained(study: optuna.Study, files: TrialFiles, trial: FrozenTrial) -> TrialWeights | None:
    path = retrained_path(files.study_dir, trial.number)
    if files.local(path) is None:
        return None
    run = _latest_retrain(study, trial)
    return TrialWeights("retrained", path, {"": path}, _scores(run) if run else {})


def _retrained_best(
    study: optuna.Study, files: TrialFiles, trial: FrozenTrial
) -> TrialWeights | None:
    from nas.search.record import TrialRecord

    path = best_path(retrained_path(files.study_dir, trial.number))
    if files.local(path) is None:
        return None
    run = _latest_retrain(study, trial)
    best = TrialRecord.of(run).best if run else {}
    scores = {"epochs_run": best.get("epoch"), "val_iou": best.get("iou"),
              "val_dice": best.get("dice")}  # fmt: skip
    return TrialWeights(RETRAINED_BEST, path, {"": path}, scores if best else {})


def _all_cases(study: optuna.Study, files: TrialFiles, trial: FrozenTrial) -> TrialWeights | None:
    from nas.search.companions import find_retrain_study
    from nas.search.record import StudyRecord

    path = all_cases_path(files.study_dir, trial.number)
    if files.local(path) is None:
        return None
    retrain = find_retrain_study(study)
    recorded = StudyRecord.of(retrain).all_cases if retrain is not None else {}
    # No validation case is left: the scores are the training's, not a validation's.
    return TrialWeights("all-cases", path, {"": path}, dict(recorded.get(str(trial.number), {})))


def _folds(study: optuna.Study, files: TrialFiles, trial: FrozenTrial) -> TrialWeights | None:
    folder = folds_folder(files.study_dir, trial.number)
    if not files.any_under(folder):  # before the crossval study is read
        return None
    from nas.search.companions import find_crossval_study, member_runs
    from nas.search.record import TrialRecord

    crossval = find_crossval_study(study)
    runs = member_runs(crossval, trial.number) if crossval is not None else []
    members, kept = {}, []
    for run in runs:
        fold = TrialRecord.of(run).fold
        path = fold_path(files.study_dir, trial.number, fold)
        if files.local(path) is not None:
            members[fold_name(fold)] = path
            kept.append(run)
    if len(members) < 2:
        return None
    per_fold = [_scores(run) for run in kept]
    scores = {
        "epochs_run": per_fold[0]["epochs_run"],
        **{
            key: sum(s[key] for s in per_fold) / len(per_fold)
            for key in ("val_iou", "val_dice")
            if all(s[key] is not None for s in per_fold)
        },
    }
    return TrialWeights("folds", folder, members, scores)


FINDERS = {
    "all-cases": _all_cases,
    "retrained": _retrained,
    RETRAINED_BEST: _retrained_best,
    "search": _search,
    "folds": _folds,
}


def find_weights(
    study: optuna.Study, study_dir: Path, trial: FrozenTrial, wanted: str = "auto"
) -> TrialWeights:
    """The weights of `trial` of kind `wanted` (one of FINDERS), or with "auto" the first kind
    in KINDS that exists; a NasError naming the commands that would train them otherwise.
    Weights another host of the study trained are fetched from its artifact store."""
    from nas.search.trial_files import trial_files

    files = trial_files(study, study_dir)
    for kind in KINDS if wanted == "auto" else (wanted,):
        found = FINDERS[kind](study, files, trial)
        if found is not None:
            return found
    n = trial.number
    retrain = f"nas retrain {study_dir} --trials {n}"
    folds = f"{retrain} --folds all"
    if wanted == "auto":
        raise NasError(
            study_dir,
            f"trial {n} has no weights (the search keeps only its front's, and neither nas "
            f"retrain nor nas retrain --folds trained it); train them with {retrain}, or "
            f"cross-validate it with {folds}",
        )
    missing = {
        "all-cases": f"trial {n} has no model trained on all cases "
        f"({all_cases_path(study_dir, n)})",
        "search": f"the search kept no weights of trial {n} (it keeps only its front's)",
        "retrained": f"trial {n} has no retrained weights ({retrained_path(study_dir, n)})",
        RETRAINED_BEST: f"trial {n} has no best retrained weights "
        f"({best_path(retrained_path(study_dir, n))}; nas retrain --all-cases validates "
        "nothing, so it keeps only its final weights)",
        "folds": f"trial {n} has no cross-validated folds with weights (at least 2 in "
        f"{folds_folder(study_dir, n)})",
    }[wanted]
    command = {"folds": folds, "all-cases": f"{retrain} --all-cases"}.get(wanted, retrain)
    raise NasError("--weights", f"{missing}; train them with {command}")
