"""Views of a study written to results/<study>/: trials.csv, pareto.csv, pareto.png, checkpoints.

Everything here is derived from the Optuna storage (the one source of truth) and can be
rewritten at any time. Each file is written to a temporary name and renamed over the old one,
so a crash mid-write never leaves a truncated table. Knows nothing of training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from nas.fidelity import may_continue  # noqa: E402
from nas.staging import atomic_write  # noqa: E402

# Always present, so an empty table still has its header.
METRIC_COLUMNS = [
    "number",
    "state",
    "val_iou",
    "val_dice",
    "test_iou",
    "test_dice",
    "n_params",
    "seconds",
    "spatial_dims",
    "epochs_run",
    "fidelity_steps",
    "continues",
    "device",
    "fail_reason",
    "macs",
    "summary",
]
# The study's user attr holding held-out test scores by trial number (written by nas.heldout).
TEST_SCORES_ATTR = "test_scores"


def checkpoint_path(study_dir: Path, trial_number: int) -> Path:
    return study_dir / "checkpoints" / f"trial_{trial_number:04d}.pt"


def state_path(weights: Path) -> Path:
    """Where the rest of a checkpoint's training state (optimizer, epoch) is kept while its
    candidate may still be promoted."""
    return weights.with_name(weights.name.removesuffix(".pt") + ".state.pt")


def save_checkpoint(study_dir: Path, trial_number: int, state_dict: dict) -> Path:
    path = checkpoint_path(study_dir, trial_number)
    atomic_write(path, lambda tmp: torch.save(state_dict, tmp))
    return path


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The non-dominated completed trials (max IoU, min params), sorted by parameter count."""
    return front_of(study.get_trials(deepcopy=False))


def front_of(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The non-dominated completed trials among `trials` (as Optuna's best_trials: equal
    values are both kept), sorted by parameter count. A candidate that a later trial trained
    further is represented by that trial only (each member at the fidelity it reached)."""
    superseded = superseded_numbers(trials)
    completed = [t for t in trials if t.state == TrialState.COMPLETE and t.number not in superseded]
    if not completed:
        return []
    # Every objective as a quantity to minimise: -IoU, params.
    points = np.array([(-t.values[0], t.values[1]) for t in completed], dtype=float)
    no_worse = (points[:, None, :] <= points[None, :, :]).all(axis=2)
    better = (points[:, None, :] < points[None, :, :]).any(axis=2)
    dominated = (no_worse & better).any(axis=0)  # [i, j]: i dominates j
    front = [t for t, out in zip(completed, dominated, strict=True) if not out]
    return sorted(front, key=lambda t: (t.values[1], -t.values[0], t.number))


def superseded_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Completed trials whose candidate a later trial continued and completed."""
    return {
        int(t.user_attrs["continues"])
        for t in trials
        if t.state == TrialState.COMPLETE and "continues" in t.user_attrs
    }


def _promotable(trial: FrozenTrial, superseded: set[int]) -> bool:
    """A completed trial the search may still train further (`fidelity.may_continue`)."""
    return (
        trial.state == TrialState.COMPLETE
        and trial.number not in superseded
        and may_continue(trial)
    )


def _row(trial: FrozenTrial, test_scores: dict) -> dict:
    attrs = trial.user_attrs
    unet = attrs.get("unet_config", {})
    test = test_scores.get(str(trial.number), {})
    row = {
        "number": trial.number,
        "state": trial.state.name,
        "val_iou": trial.values[0] if trial.values else attrs.get("val_iou"),
        "val_dice": attrs.get("val_dice"),
        "test_iou": test.get("test_iou"),
        "test_dice": test.get("test_dice"),
        "n_params": attrs.get("n_params"),
        "seconds": attrs.get("seconds"),
        "spatial_dims": unet.get("spatial_dims"),
        "epochs_run": attrs.get("epochs_run"),
        "fidelity_steps": attrs.get("fidelity_steps"),
        "continues": attrs.get("continues"),
        "device": attrs.get("device"),
        "fail_reason": attrs.get("fail_reason"),
        "macs": attrs.get("macs"),
        "summary": attrs.get("summary"),
    }
    for name, value in unet.items():
        if name not in row:
            row[name] = str(value) if isinstance(value, list) else value
    for name, value in trial.params.items():
        if name not in row and name not in unet:
            row[name] = value
    return row


def trials_table(trials: list[FrozenTrial], test_scores: dict | None = None) -> pd.DataFrame:
    """One row per trial; `test_scores`: the study's TEST_SCORES_ATTR, held-out scores by
    trial number, which only report: the front is chosen on validation alone."""
    rows = [_row(t, test_scores or {}) for t in trials]
    return pd.DataFrame(
        rows, columns=list(dict.fromkeys([*METRIC_COLUMNS, *(k for r in rows for k in r)]))
    )


def _plot_front(
    study_name: str, trials: Sequence[FrozenTrial], front: list[FrozenTrial], path: Path
) -> None:
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dims, marker in ((2, "o"), (3, "s")):
        group = [
            t for t in completed if t.user_attrs.get("unet_config", {}).get("spatial_dims") == dims
        ]
        ax.scatter(
            [t.values[1] for t in group],
            [t.values[0] for t in group],
            marker=marker,
            color="0.6",
            label=f"{dims}D trials",
        )
    if front:
        ax.step(
            [t.values[1] for t in front],
            [t.values[0] for t in front],
            where="post",
            color="tab:red",
            marker="*",
            markersize=12,
            label="Pareto front",
        )
        for t in front:
            ax.annotate(
                f"#{t.number}",
                (t.values[1], t.values[0]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    if completed:
        ax.set_xscale("log")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no completed trial yet", ha="center", transform=ax.transAxes)
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation IoU")
    ax.set_title(f"{study_name}: {len(completed)} completed trials")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_results(study: optuna.Study, study_dir: Path) -> list[FrozenTrial]:
    """Rewrite every view of `study` under `study_dir`; drop weights of trials off the front.

    The table, the front and the weights to drop all come from one read of the storage: a
    trial that finishes during the rewrite is RUNNING in that read, so its weights stay. A
    candidate the search may still promote keeps its weights and training state. Any other
    finished trial off the front in one read is off it in every later read (trials never
    leave COMPLETE, a continued candidate never returns to the front), so dropping its
    weights is final and safe.
    """
    trials = study.get_trials(deepcopy=False)
    front = front_of(trials)
    test = study.user_attrs.get(TEST_SCORES_ATTR, {})
    atomic_write(
        study_dir / "trials.csv", lambda p: trials_table(trials, test).to_csv(p, index=False)
    )
    atomic_write(
        study_dir / "pareto.csv", lambda p: trials_table(front, test).to_csv(p, index=False)
    )
    atomic_write(
        study_dir / "pareto.png", lambda p: _plot_front(study.study_name, trials, front, p)
    )
    on_front = {t.number for t in front}
    superseded = superseded_numbers(trials)
    for trial in trials:
        if not trial.state.is_finished():
            continue
        weights = checkpoint_path(study_dir, trial.number)
        if not _promotable(trial, superseded):
            state_path(weights).unlink(missing_ok=True)
            if trial.number not in on_front:
                weights.unlink(missing_ok=True)
    return front
