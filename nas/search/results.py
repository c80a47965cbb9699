"""Views of a study written to results/<study>/: trials.csv, pareto.csv, pareto.png.

Everything here is derived from the Optuna storage (the one source of truth) and can be
rewritten at any time. Each file is written to a temporary name and renamed over the old one,
so a crash mid-write never leaves a truncated table. Knows nothing of training: the weights of
the trials the views leave off the front are dropped through nas/search/weights.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator  # noqa: E402
from optuna.trial import FrozenTrial  # noqa: E402

from nas.core.staging import atomic_write  # noqa: E402
from nas.search.objectives import METRIC_COLUMNS, OBJECTIVES, curve_metric, score_of  # noqa: E402
from nas.search.record import (  # noqa: E402
    QUANTITY_ATTRS,
    StudyRecord,
    TrialRecord,
    records,
    study_objectives,
)
from nas.search.schedule.continuation import may_continue  # noqa: E402
from nas.search.schedule.endgame import undertrained  # noqa: E402
from nas.search.scoring import Interval, front_intervals, front_of, superseded_numbers  # noqa: E402
from nas.search.trial_files import trial_files  # noqa: E402
from nas.search.weights import drop_weights  # noqa: E402


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The non-dominated feasible completed trials over the study's objectives."""
    return front_of(study.get_trials(deepcopy=False), study_objectives(study).names)


def _row(trial: FrozenTrial, test_scores: dict) -> dict:
    record = TrialRecord.of(trial)
    unet = record.unet_config
    test = test_scores.get(str(trial.number), {})
    row = {
        "number": record.number,
        "state": record.state.name,
        "val_iou": record.quantity("iou"),
        "val_dice": record.quantity("dice"),
        "val_case_dice": record.quantity("case_dice"),
        "test_iou": test.get("test_iou"),
        "test_dice": test.get("test_dice"),
        "n_params": record.n_params,
        "seconds": record.seconds,
        "spatial_dims": record.spatial_dims,
        "epochs_run": record.epochs_run,
        "fidelity_steps": record.fidelity_steps,
        "continues": record.continues,
        "device": record.device,
        "fail_reason": record.fail_reason,
        "macs": record.quantity("macs"),
        "latency_ms": record.quantity("latency_ms"),
        "latency_iqr_ms": record.latency_iqr_ms,
        "memory_mb": record.quantity("memory_mb"),
        "rejected": record.rejected,
        "feasible": record.feasible,
        "summary": record.summary,
    }
    for name, value in unet.items():
        if name not in row:
            row[name] = str(value) if isinstance(value, list) else value
    for name, value in record.params.items():
        if name not in row and name not in unet:
            row[name] = value
    return row


def trials_table(trials: list[FrozenTrial], test_scores: dict | None = None) -> pd.DataFrame:
    """One row per trial; `test_scores`: the study's recorded test_scores, held-out scores by
    trial number, which only report: the front is chosen on validation alone."""
    rows = [_row(t, test_scores or {}) for t in trials]
    return pd.DataFrame(
        rows, columns=list(dict.fromkeys([*METRIC_COLUMNS, *(k for r in rows for k in r)]))
    )


def front_table(
    front: list[FrozenTrial],
    test_scores: dict | None = None,
    intervals: Mapping[int, Interval] | None = None,
    volume_scores: Mapping[str, Any] | None = None,
    metric: str = "iou",
) -> pd.DataFrame:
    """The front's rows, with: the search score's standard error over the validation cases
    and the interval it spans (`scoring.interval`), after the score's column (`metric`, what
    the curves hold: val_iou_se, ..., or val_case_dice_se, ...); the score of the whole
    validation volumes, predicted once per member after the search (`volume_scores`: its
    volume_val_iou, and volume_val_case_dice where that is the score), beside the patch score
    the search decided on; `undertrained`: trained far fewer steps than a member of similar
    cost (nas.search.schedule.fidelity.undertrained); `below_top_rung`: stopped below the schedule's
    top rung."""
    table = trials_table(front, test_scores)
    intervals, volume_scores = intervals or {}, volume_scores or {}
    column = QUANTITY_ATTRS[metric]  # val_iou, val_case_dice
    at = table.columns.get_loc(column) + 1
    known = [intervals.get(n) for n in table["number"]]
    for offset, value in enumerate(("se", "low", "high")):
        table.insert(at + offset, f"{column}_{value}", [getattr(i, value) if i else None
                                                        for i in known])  # fmt: skip
    for offset, score in enumerate(dict.fromkeys([metric, "iou"])):
        volume = [volume_scores.get(str(n), {}).get(score) for n in table["number"]]
        table.insert(at + 3 + offset, f"volume_{QUANTITY_ATTRS[score]}", volume)
    marked = undertrained_numbers(front)
    at = table.columns.get_loc("fidelity_steps") + 1
    table.insert(at, "undertrained", [n in marked for n in table["number"]])
    below = {r.number for r in records(front) if r.rungs and (r.epochs_run or 0) < r.rungs[-1]}
    table.insert(at + 1, "below_top_rung", [n in below for n in table["number"]])
    return table


def undertrained_numbers(front: Sequence[FrozenTrial]) -> set[int]:
    """Front members trained fewer than a quarter of the steps of the longest-trained member
    within a factor of ten in parameters (a trial without either recorded is not judged)."""
    known = [
        (r.number, r.n_params, r.fidelity_steps)
        for r in records(front)
        if r.n_params is not None and r.fidelity_steps is not None
    ]
    marks = undertrained([(params, steps) for _, params, steps in known])
    return {number for (number, _, _), marked in zip(known, marks, strict=True) if marked}


def panels(objectives: Sequence[str]) -> tuple[str, list[str]]:
    """The score drawn on the y axis and the objectives drawn against it, one panel each."""
    score = score_of(objectives)
    return score, [n for n in objectives if n != score]


def _plot_front(
    study_name: str,
    trials: Sequence[FrozenTrial],
    front: list[FrozenTrial],
    objectives: Sequence[str],
    path: Path,
    intervals: Mapping[int, Interval] | None = None,
) -> None:
    """The score against each other objective; the front's members with their score's
    standard error over the validation cases as error bars."""
    completed = [r for r in records(trials) if r.complete]
    intervals = intervals or {}
    on_front = [TrialRecord.of(t) for t in front]
    score, others = panels(objectives)
    fig, axes = plt.subplots(1, len(others), figsize=(7 * len(others), 4.5), squeeze=False)
    for ax, other in zip(axes[0], others, strict=True):
        for dims, marker in ((2, "o"), (3, "s")):
            group = [r for r in completed if r.spatial_dims == dims]
            ax.scatter([r.quantity(other) for r in group], [r.quantity(score) for r in group],
                       marker=marker, color="0.6", label=f"{dims}D trials")  # fmt: skip
        if on_front:
            by_x = sorted(on_front, key=lambda r: r.quantity(other))
            xs, ys = [r.quantity(other) for r in by_x], [r.quantity(score) for r in by_x]
            ax.scatter(xs, ys, color="tab:red", marker="*", s=140, label="Pareto front",
                       zorder=3)  # fmt: skip
            errors = [intervals[r.number].se if r.number in intervals else 0.0 for r in by_x]
            if score == curve_metric(objectives) and any(errors):
                ax.errorbar(xs, ys, yerr=errors, fmt="none", ecolor="tab:red", capsize=3,
                            zorder=2)  # fmt: skip
            if len(objectives) == 2:  # the front is a staircase only in two objectives
                ax.step(xs, ys, where="post", color="tab:red")
            for r in by_x:
                ax.annotate(f"#{r.number}", (r.quantity(other), r.quantity(score)),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
        if completed:
            if not OBJECTIVES[other].maximise:
                ax.set_xscale("log")
                # Plain numbers: matplotlib's default 10^k labels go through its slow mathtext.
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # within a decade too
                ax.xaxis.set_major_formatter(FuncFormatter(_plain))
                ax.xaxis.set_minor_locator(NullLocator())  # the refresh runs after each trial
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "no completed trial yet", ha="center", transform=ax.transAxes)
        ax.set_xlabel(OBJECTIVES[other].label)
        ax.set_ylabel(OBJECTIVES[score].label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{study_name}: {len(completed)} completed trials")
    # A fixed layout: tight_layout measures every tick label, a third of the time here.
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.9, wspace=0.25)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _plain(value: float, _position: int) -> str:
    """A tick label without mathtext: 20, 5,000, 1,000,000, 0.5."""
    return f"{value:,.0f}" if value >= 1 else f"{value:.3g}"


def write_results(
    study: optuna.Study, study_dir: Path, trials: Sequence[FrozenTrial] | None = None
) -> list[FrozenTrial]:
    """Rewrite every view of `study` under `study_dir`; drop weights of trials off the front
    (here, and from the study's shared artifact store when it has one).
    `trials`: the study's trials, when the caller has just read them.

    The table, the front and the weights to drop all come from one read of the storage: a
    trial that finishes during the rewrite is RUNNING in that read, so its weights stay. A
    candidate the search may still promote keeps its weights and training state. Any other
    finished trial off the front in one read is off it in every later read (trials never
    leave COMPLETE, a continued candidate never returns to the front), so dropping its
    weights is final and safe.
    """
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    objectives = study_objectives(study).names
    front = front_of(trials, objectives)
    recorded = StudyRecord.of(study)
    test, intervals = recorded.test_scores, front_intervals(study, front)
    atomic_write(
        study_dir / "trials.csv", lambda p: trials_table(trials, test).to_csv(p, index=False)
    )
    metric = curve_metric(objectives)
    table = front_table(front, test, intervals, recorded.volume_scores, metric)
    atomic_write(study_dir / "pareto.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(
        study_dir / "pareto.png",
        lambda p: _plot_front(study.study_name, trials, front, objectives, p, intervals),
    )
    on_front = {t.number for t in front}
    superseded = superseded_numbers(trials)
    files = trial_files(study, study_dir)
    drop_weights(files, trials, on_front, lambda trial: may_continue(trial, superseded))
    return front
