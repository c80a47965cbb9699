"""results/<study>/report.html: the search at a glance, in one file that needs no network.

Interactive Pareto front (hover shows the architecture), hypervolume after each trial,
learning curves, parameter importances for IoU, the front as a table and the validation
overlays of its members. Plotly draws the charts; its JavaScript is embedded once, so the
file opens anywhere. Rewritten after every trial by `nas.run`, and on demand by
`python -m nas.report results/<study>`. Derived from the study alone, like the CSV files.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from nas.commands.cli import command_parser, exit_code
from nas.core.staging import atomic_write

if TYPE_CHECKING:
    import numpy as np
    import optuna
    import pandas as pd
    import plotly.graph_objects as go
    from optuna.trial import FrozenTrial

    from nas.search.record import TrialRecord

REPORT_FILE = "report.html"
# The front table's column groups: validation chose the front, the held-out cases did not.
HELD_OUT = "held-out test (not used for selection)"
COLUMN_GROUPS = {
    "val_iou": "validation (selection)",
    "val_dice": "validation (selection)",
    "val_case_dice": "validation (selection)",
    "test_iou": HELD_OUT,
    "test_dice": HELD_OUT,
}


def hypervolume(points: Sequence[tuple[float, float]]) -> float:
    """Area dominated by (iou, size) points, IoU maximised in [0, 1], size in [0, 1]
    minimised, reference point (IoU 0, size 1)."""
    import numpy as np

    from nas.search.objectives import hypervolume as objectives_hypervolume

    low = np.array([(-iou, size) for iou, size in points], dtype=float).reshape(-1, 2)
    return objectives_hypervolume(low, np.array([0.0, 1.0]))


def normalised_size(n_params: float, bounds: tuple[float, float]) -> float:
    """log10(params) mapped to [0, 1] between log10 bounds."""
    low, high = bounds
    return min(1.0, max(0.0, (math.log10(n_params) - low) / max(high - low, 1e-9)))


def log_bounds(values: Sequence[float]) -> tuple[float, float]:
    """The log10 range a cost is normalised over: its observed range, widened by 0.1."""
    logs = [math.log10(max(v, 1e-12)) for v in values]
    return (min(logs), max(logs) + 0.1)


def normalised_points(
    done: Sequence[TrialRecord], objectives: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, str]:
    """Every objective minimised in [0, 1]: scores as -score (reference 0), costs on a log
    scale between their observed bounds (reference 1); with the reference and its words."""
    import numpy as np

    from nas.search.objectives import OBJECTIVES

    columns, reference, words = [], [], []
    for name in objectives:
        values = [r.quantity(name) for r in done]
        if OBJECTIVES[name].maximise:
            columns.append([-v for v in values])
            reference.append(0.0)
            words.append(f"{name} 0")
        else:
            bounds = log_bounds(values)
            columns.append([normalised_size(v, bounds) for v in values])
            reference.append(1.0)
            words.append(f"log10 {name} in [{bounds[0]:.2f}, {bounds[1]:.2f}]")
    points = np.array(columns, dtype=float).T.reshape(len(done), len(objectives))
    return points, np.array(reference), ", ".join(words)


def running_hypervolume(points: np.ndarray, reference: np.ndarray) -> list[float]:
    """The hypervolume of points[:i + 1] for every i (rows minimised): the running front is
    kept, so each step costs the size of the front, not of the study."""
    import numpy as np

    from nas.search.objectives import hypervolume as objectives_hypervolume

    front = np.empty((0, points.shape[1]))
    curve: list[float] = []
    for point in points:
        if not any((other <= point).all() for other in front):  # not dominated, not a copy
            keep = ~(point <= front).all(axis=1) if len(front) else np.zeros(0, dtype=bool)
            front = np.vstack([front[keep], point])
            curve.append(objectives_hypervolume(front, reference))
        else:
            curve.append(curve[-1])
    return curve


def _hover(record: TrialRecord, objectives: Sequence[str]) -> str:
    from nas.search.objectives import OBJECTIVES

    measured = "<br>".join(
        f"{OBJECTIVES[n].label} {record.quantity(n):,.4g}"
        for n in objectives
        if record.quantity(n) is not None
    )
    return (
        f"trial {record.number} ({record.state.name})<br>{measured}<br>"
        f"{html.escape(record.summary)}"
    )


def _front_figure(
    trials: Sequence[FrozenTrial],
    front: list[FrozenTrial],
    objectives: Sequence[str],
    errors: Mapping[int, float],
) -> go.Figure:
    """The score against each other objective, one panel each (two objectives: one); the
    front's members with `errors` (their score's standard error, by trial) as error bars."""
    import numpy as np
    import plotly.graph_objects as go
    from optuna.trial import TrialState
    from plotly.subplots import make_subplots

    from nas.search.objectives import OBJECTIVES, curve_metric
    from nas.search.record import TrialRecord, records
    from nas.search.results import panels

    score, others = panels(objectives)
    on_front = {t.number for t in front}
    every = records(trials)
    groups = {
        "completed": [r for r in every if r.complete and r.number not in on_front],
        "pruned (last IoU)": [
            r for r in every
            if r.state == TrialState.PRUNED and r.iou is not None and r.number not in on_front
        ],
    }  # fmt: skip
    members = [TrialRecord.of(t) for t in front]
    fig = make_subplots(rows=1, cols=len(others))
    for column, other in enumerate(others, start=1):
        for name, group in groups.items():
            group = [r for r in group if r.quantity(other) is not None]
            fig.add_trace(
                go.Scatter(  # arrays: plotly checks them whole, not value by value
                    x=np.array([r.quantity(other) for r in group], dtype=float),
                    y=np.array([r.quantity(score) for r in group], dtype=float),
                    mode="markers",
                    name=name,
                    legendgroup=name,
                    showlegend=column == 1,
                    marker={
                        "color": "#999" if name == "completed" else "#ccc",
                        "symbol": "circle" if name == "completed" else "circle-open",
                        "size": 8,
                    },
                    text=[_hover(r, objectives) for r in group],
                    hoverinfo="text",
                ),
                row=1,
                col=column,
            )
        by_x = sorted(members, key=lambda r: r.quantity(other))
        fig.add_trace(
            go.Scatter(
                x=[r.quantity(other) for r in by_x],
                y=[r.quantity(score) for r in by_x],
                mode="lines+markers" if len(objectives) == 2 else "markers",
                line={"shape": "hv", "color": "#d62728"},
                marker={"size": 12, "symbol": "star", "color": "#d62728"},
                name="Pareto front",
                legendgroup="front",
                error_y={
                    "type": "data",
                    "array": [errors.get(r.number, 0.0) for r in by_x],
                    "visible": score == curve_metric(objectives) and bool(errors),
                },  # fmt: skip
                showlegend=column == 1,
                text=[_hover(r, objectives) for r in by_x],
                hoverinfo="text",
            ),
            row=1,
            col=column,
        )
        log = not OBJECTIVES[other].maximise
        fig.update_xaxes(title_text=OBJECTIVES[other].label, type="log" if log else None,
                         row=1, col=column)  # fmt: skip
        fig.update_yaxes(title_text=OBJECTIVES[score].label, range=[0, 1], row=1, col=column)
    names = " vs ".join(OBJECTIVES[n].label for n in [score, *others])
    fig.update_layout(title=f"Pareto front: {names}", height=450, template="plotly_white")
    return fig


def _hypervolume_figure(trials: Sequence[FrozenTrial], objectives: Sequence[str]) -> go.Figure:
    import numpy as np
    import plotly.graph_objects as go

    from nas.search.record import records

    done = sorted(
        (r for r in records(trials) if r.complete and r.feasible),
        key=lambda r: r.completed_at or datetime.min,
    )
    fig = go.Figure()
    if done:
        points, reference, note = normalised_points(done, objectives)
        curve = running_hypervolume(points, reference)
        numbers = np.array([r.number for r in done])
        fig.add_trace(go.Scatter(x=numbers, y=np.array(curve), mode="lines+markers", name="front"))
        note = f"{note}; reference ({', '.join(f'{v:g}' for v in reference)})"
    else:
        note = "no completed trial yet"
    fig.update_layout(
        title=f"Hypervolume after each completed trial ({note})",
        xaxis={"title": "trial"},
        yaxis={"title": "hypervolume"},
        height=350,
        template="plotly_white",
    )
    return fig


def _curves_figure(
    trials: Sequence[FrozenTrial], front: list[FrozenTrial], label: str = "validation IoU"
) -> go.Figure:
    """Every learning curve: the front's one trace each, the others drawn as one trace per
    state (curves separated by gaps), so the figure's size does not grow a trace per trial;
    `label`: what the curves hold."""
    import numpy as np
    import plotly.graph_objects as go

    from nas.search.record import TrialRecord

    on_front = {t.number for t in front}
    fig = go.Figure()
    others: dict[str, tuple[list, list, list]] = {}
    for trial in trials:
        curve = sorted(trial.intermediate_values.items())
        if not curve:
            continue
        label = f"#{trial.number} {trial.state.name.lower()}"
        hover = f"{label}: {TrialRecord.of(trial).summary}"
        if trial.number in on_front:
            fig.add_trace(
                go.Scatter(
                    x=[e for e, _ in curve],
                    y=[v for _, v in curve],
                    mode="lines+markers",
                    name=label,
                    line={"color": "#d62728", "width": 2.5},
                    hovertext=hover,
                )
            )
            continue
        xs, ys, texts = others.setdefault(trial.state.name.lower(), ([], [], []))
        xs += [e for e, _ in curve] + [math.nan]  # NaN: a gap between two curves
        ys += [v for _, v in curve] + [math.nan]
        texts += [label] * len(curve) + [""]
    for state, (xs, ys, texts) in others.items():
        fig.add_trace(
            go.Scatter(  # arrays: plotly checks them whole, not value by value
                x=np.array(xs),
                y=np.array(ys).round(4),
                mode="lines+markers",
                name=f"{state} (not on the front)",
                line={"color": "#999", "width": 1, "dash": "dot" if state == "pruned" else "solid"},
                marker={"size": 4},
                hovertext=texts,
                hoverinfo="text+y",
            )
        )
    fig.update_layout(
        title=f"Learning curves: {label} per epoch (red: front, dotted: pruned)",
        xaxis={"title": "epoch"},
        yaxis={"title": label, "range": [0, 1]},
        height=400,
        template="plotly_white",
    )
    return fig


def _importance_figure(study: optuna.Study, score: str) -> go.Figure | str:
    import optuna
    import plotly.graph_objects as go

    from nas.search.objectives import OBJECTIVES
    from nas.search.record import TrialRecord

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. few trials, or an experimental evaluator
            importances = optuna.importance.get_param_importances(
                study,
                # PED-ANOVA explains low target values: which parameters lead to a high IoU.
                target=lambda t: -TrialRecord.of(t).quantity(score),
                evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            )
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        return f"Not available yet ({err})."
    if not importances:
        return "Not available yet: it needs completed trials that differ in their parameters."
    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    fig.update_layout(
        title=f"Parameter importances for {OBJECTIVES[score].label} (PED-ANOVA)",
        xaxis={"title": "importance"},
        height=max(300, 28 * len(names) + 120),
        template="plotly_white",
    )
    return fig


def _overlays(study: optuna.Study, study_dir: Path, front: list[FrozenTrial]) -> str:
    from nas.search.artifacts import overlay_path
    from nas.search.record import TrialRecord
    from nas.search.trial_files import trial_files

    files = trial_files(study, study_dir)  # another host's overlays are fetched
    uploaded = files.records()
    images = []
    for trial in sorted(front, key=lambda t: -(TrialRecord.of(t).iou or 0.0)):
        path = overlay_path(study_dir, trial.number)
        if files.local(path, uploaded) is not None:
            data = base64.b64encode(path.read_bytes()).decode()
            images.append(
                f'<figure><img alt="overlay of trial {trial.number}" '
                f'src="data:image/png;base64,{data}"><figcaption>trial {trial.number}: '
                f"{html.escape(TrialRecord.of(trial).summary)}</figcaption></figure>"
            )
    return "\n".join(images) or "<p>No overlay yet.</p>"


def _front_table(table: pd.DataFrame) -> str:
    """The front as HTML, validation and held-out scores under headers of their own; the
    held-out columns only where some member was scored on a test split."""
    import pandas as pd

    from nas.search.objectives import FRONT_COLUMNS, MEASURED_ONLY_WHEN_ASKED

    scored = table["test_iou"].notna().any()
    columns = [
        c
        for c in FRONT_COLUMNS
        if c in table.columns and (scored or COLUMN_GROUPS.get(c) != HELD_OUT)
        and (c not in MEASURED_ONLY_WHEN_ASKED or table[c].notna().any())
    ]  # fmt: skip
    shown = table[columns].copy()
    shown.columns = pd.MultiIndex.from_tuples([(COLUMN_GROUPS.get(c, ""), c) for c in columns])
    return shown.to_html(index=False, float_format="{:.4f}".format, na_rep="", border=0)


def _choice_line(study: optuna.Study, front: Sequence[FrozenTrial]) -> str:
    from nas.search.choice import one_standard_error

    if not front:
        return "no member yet"
    best, chosen, _ = one_standard_error(study)
    return f"trial {chosen}; the best score is trial {best}'s"


def _rungs_section(trials: Sequence[FrozenTrial]) -> str:
    """How well each rung's ranking foretold the next one's (Spearman over the candidates that
    reached both): a weak first cut discards candidates on noise."""
    import pandas as pd

    from nas.search.scoring import raised_first_cut, rung_correlations

    rows = rung_correlations(trials)
    if not rows:
        return ""
    table = pd.DataFrame(rows).rename(
        columns={"lower": "rung (epochs)", "upper": "next rung", "candidates": "at both"}
    )
    raised = raised_first_cut(trials)
    note = (
        f"<p>The first cut foretold the next rung weakly: new candidates from trial {raised[0]} "
        f"on trained to epoch {raised[1]} before their first ranking.</p>"
        if raised
        else ""
    )
    return (
        "<h3>How well each rung foretells the next</h3>"
        + note
        + table.to_html(index=False, float_format="{:.2f}".format, na_rep="", border=0)
    )


def _mean_sd(mean: float, sd: float | None) -> str:
    return f"{mean:.4f}" if sd is None or math.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def _crossval_section(study: optuna.Study) -> str:
    """Cross-validated members (nas.retrain --folds): mean ± sd over the folds, the
    postprocessing chosen, and on held-out cases a fold's model, the fold ensemble and the
    ensemble with mirroring side by side with their inference time."""
    import pandas as pd

    from nas.search.companions import ensemble_rows, find_crossval_study, summary_rows

    crossval = find_crossval_study(study)
    if crossval is None:
        return ""
    rows = summary_rows(crossval, study)
    if not rows:
        return ""
    members = pd.DataFrame(
        {
            "trial": [r["trial"] for r in rows],
            "params": [f"{r['n_params']:,}" for r in rows],
            "folds": [r["folds"] for r in rows],
            "epochs": [r["epochs"] for r in rows],
            "search val IoU": [f"{r['search_val_iou']:.4f}" for r in rows],
            "CV IoU": [_mean_sd(r["cv_iou_mean"], r["cv_iou_sd"]) for r in rows],
            "CV Dice": [_mean_sd(r["cv_dice_mean"], r["cv_dice_sd"]) for r in rows],
            "largest component": [r["largest_component"] or "not applied" for r in rows],
        }
    )
    parts = [
        "<h2>Cross-validation</h2>",
        "<p>Each member trained again on every fold (nas.retrain --folds); the search's own "
        "scores come from the one fold it selected on.</p>",
        members.to_html(index=False, border=0),
        _choices(study),
    ]
    from nas.evaluation.member_ensemble import recorded

    oof, chosen = recorded(crossval)
    if oof:
        parts += [
            "<h3>Members and their ensembles, out of fold</h3>",
            f"<p>Chosen: {chosen['members']} (nas export --ensemble members exports an "
            "ensemble).</p>",
            pd.DataFrame(oof).to_html(index=False, float_format="{:.4f}".format, border=0),
        ]
    ensemble = pd.DataFrame(ensemble_rows(crossval))
    if not ensemble.empty:
        parts += [
            "<h3>Held-out cases: one fold's model, the fold ensemble, mirrored</h3>",
            ensemble.to_html(index=False, float_format="{:.4f}".format, border=0),
        ]
    return "\n".join(parts)


def _choices(study: optuna.Study) -> str:
    """Which member `nas export --best` exports by the search's score and by cross-validation,
    and a warning when they differ."""
    from nas.search.choice import choose_trial

    search, cv = (choose_trial(study, None, None, by).number for by in ("search", "cv"))
    if search == cv:
        return f"<p>The search and the cross-validation choose the same member: trial {cv}.</p>"
    return (
        f"<p><strong>The choices differ:</strong> the search's best is trial {search}, the "
        f"cross-validation's trial {cv} (<code>nas export RESULTS --best --by cv</code>).</p>"
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
td:last-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; }
figcaption { font-size: 0.8em; color: #555; max-width: 720px; }
img { max-width: 720px; }
"""


def render(
    study: optuna.Study,
    study_dir: Path,
    trials: Sequence[FrozenTrial] | None = None,
    front: list[FrozenTrial] | None = None,
) -> str:
    """`trials` and their `front`: as the caller has just read and computed them."""
    from optuna.trial import TrialState

    from nas.search.objectives import OBJECTIVES, curve_metric
    from nas.search.record import QUANTITY_ATTRS, StudyRecord, TrialRecord, study_objectives
    from nas.search.results import front_table as front_table_of
    from nas.search.results import panels
    from nas.search.scoring import front_intervals, front_of

    trials = study.get_trials(deepcopy=False) if trials is None else trials
    objectives = study_objectives(study).names
    score, metric = panels(objectives)[0], curve_metric(objectives)
    front = front_of(trials, objectives) if front is None else front
    states = {s.name: 0 for s in TrialState}
    for trial in trials:
        states[trial.state.name] += 1
    counts = ", ".join(f"{n} {name.lower()}" for name, n in states.items() if n)
    best = max((TrialRecord.of(t).quantity(score) for t in front), default=None)
    recorded = StudyRecord.of(study)
    intervals = front_intervals(study, front)
    figures: list[go.Figure | str] = [
        _front_figure(trials, front, objectives, {n: i.se for n, i in intervals.items()}),
        _hypervolume_figure(trials, objectives),
        _curves_figure(trials, front, OBJECTIVES[metric].label),
        _importance_figure(study, score),
    ]
    parts, script_embedded = [], False
    for figure in figures:
        if isinstance(figure, str):
            parts.append(f"<h3>Parameter importances</h3><p>{html.escape(figure)}</p>")
            continue
        parts.append(figure.to_html(full_html=False, include_plotlyjs=not script_embedded))
        script_embedded = True
    table = front_table_of(front, recorded.test_scores, intervals, recorded.volume_scores, metric)
    front_table = _front_table(table)
    column = QUANTITY_ATTRS[metric]
    dataset = recorded.dataset()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary_line = (
        f"{counts or 'no trials'}; objectives {', '.join(objectives)}; best "
        f"{OBJECTIVES[score].label} {best:.4f}; front of {len(front)}"
        if best is not None
        else f"{counts or 'no trials'}; no completed trial yet"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>nas report: {html.escape(study.study_name)}</title><style>{STYLE}</style></head>
<body>
<h1>Study {html.escape(study.study_name)}</h1>
<p>{html.escape(summary_line)}. Data: {html.escape(str(dataset))}. Written {created}.</p>
{"".join(parts)}
<h2>The front</h2>
<p>{column} is the search's score (smoothed over the last validations, on the fixed validation
patches) at each member's fidelity, +- {column}_se its standard error over the validation
cases (bootstrap); volume_{column} the whole validation volumes, predicted once after the
search. <code>nas export --best</code> takes the smallest member within one standard error of
the best score ({_choice_line(study, front)}).</p>
{front_table}
{_rungs_section(trials)}
{_crossval_section(study)}
<h2>Validation overlays of the front (green: ground truth, red: prediction)</h2>
{_overlays(study, study_dir, front)}
</body></html>
"""


CURVES_GRAPH_ID = "learning-curves"


def publish_curves(study: optuna.Study, front: list[FrozenTrial] | None = None) -> None:
    """Show the front's learning curves on the study's page in optuna-dashboard, which plots
    intermediate values for single-objective studies only. The front's alone: the figure is
    written into the storage after every trial (report.html draws every curve)."""
    from optuna_dashboard import save_plotly_graph_object

    from nas.search.objectives import OBJECTIVES, curve_metric
    from nas.search.record import study_objectives
    from nas.search.scoring import front_of

    objectives = study_objectives(study).names
    if front is None:
        front = front_of(study.get_trials(deepcopy=False), objectives)
    figure = _curves_figure(front, front, OBJECTIVES[curve_metric(objectives)].label)
    save_plotly_graph_object(study, figure, graph_object_id=CURVES_GRAPH_ID)


def write_report(
    study: optuna.Study,
    study_dir: Path,
    trials: Sequence[FrozenTrial] | None = None,
    front: list[FrozenTrial] | None = None,
) -> Path:
    """`trials` and their `front`: as the caller has just read and computed them."""
    path = study_dir / REPORT_FILE
    text = render(study, study_dir, trials, front)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("report", __doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/unet")
    parser.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from nas.search.study import load_results_study

    study = load_results_study(args.results, args.storage)
    print(f"wrote {write_report(study, args.results)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
