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
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from optuna_dashboard import save_plotly_graph_object

from nas.artifacts import overlay_path
from nas.cli import exit_code
from nas.results import TEST_SCORES_ATTR, front_of, trials_table
from nas.staging import atomic_write
from nas.study import load_results_study

REPORT_FILE = "report.html"
FRONT_COLUMNS = [
    "number", "val_iou", "val_dice", "test_iou", "test_dice", "n_params", "macs",
    "epochs_run", "fidelity_steps", "continues", "seconds", "summary",
]  # fmt: skip
# The front table's column groups: validation chose the front, the held-out cases did not.
HELD_OUT = "held-out test (not used for selection)"
COLUMN_GROUPS = {
    "val_iou": "validation (selection)",
    "val_dice": "validation (selection)",
    "test_iou": HELD_OUT,
    "test_dice": HELD_OUT,
}


def hypervolume(points: Sequence[tuple[float, float]]) -> float:
    """Area dominated by (iou, size) points, IoU maximised in [0, 1], size in [0, 1]
    minimised, reference point (IoU 0, size 1)."""
    front: list[tuple[float, float]] = []
    for size, iou in sorted((s, i) for i, s in points if i > 0 and s < 1):
        if not front or iou > front[-1][1]:
            front.append((size, iou))
    if not front:
        return 0.0
    edges = [s for s, _ in front[1:]] + [1.0]
    return sum((end - size) * iou for (size, iou), end in zip(front, edges, strict=True))


def normalised_size(n_params: float, bounds: tuple[float, float]) -> float:
    """log10(params) mapped to [0, 1] between log10 bounds."""
    low, high = bounds
    return min(1.0, max(0.0, (math.log10(n_params) - low) / max(high - low, 1e-9)))


def _hover(trial: FrozenTrial, iou: float) -> str:
    attrs = trial.user_attrs
    return (
        f"trial {trial.number} ({trial.state.name})<br>IoU {iou:.4f}<br>"
        f"{attrs.get('n_params', 0):,} params<br>{html.escape(attrs.get('summary', ''))}"
    )


def _front_figure(trials: Sequence[FrozenTrial], front: list[FrozenTrial]) -> go.Figure:
    fig = go.Figure()
    on_front = {t.number for t in front}
    groups = {
        "completed": [t for t in trials if t.state == TrialState.COMPLETE],
        "pruned (last IoU)": [
            t for t in trials if t.state == TrialState.PRUNED and "val_iou" in t.user_attrs
        ],
    }
    for name, trials in groups.items():
        trials = [t for t in trials if t.number not in on_front]
        ious = [t.values[0] if t.values else t.user_attrs["val_iou"] for t in trials]
        fig.add_trace(
            go.Scatter(
                x=[t.user_attrs["n_params"] for t in trials],
                y=ious,
                mode="markers",
                name=name,
                marker={
                    "color": "#999" if name == "completed" else "#ccc",
                    "symbol": "circle" if name == "completed" else "circle-open",
                    "size": 8,
                },
                text=[_hover(t, iou) for t, iou in zip(trials, ious, strict=True)],
                hoverinfo="text",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[t.values[1] for t in front],
            y=[t.values[0] for t in front],
            mode="lines+markers",
            line={"shape": "hv", "color": "#d62728"},
            marker={"size": 12, "symbol": "star"},
            name="Pareto front",
            text=[_hover(t, t.values[0]) for t in front],
            hoverinfo="text",
        )
    )
    fig.update_layout(
        title="Pareto front: validation IoU vs parameters",
        xaxis={"title": "parameters", "type": "log"},
        yaxis={"title": "validation IoU", "range": [0, 1]},
        height=450,
        template="plotly_white",
    )
    return fig


def _hypervolume_figure(trials: Sequence[FrozenTrial]) -> go.Figure:
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete
    )
    fig = go.Figure()
    if done:
        sizes = [math.log10(t.values[1]) for t in done]
        bounds = (min(sizes), max(sizes) + 0.1)
        points, curve = [], []
        for trial in done:
            points.append((trial.values[0], normalised_size(trial.values[1], bounds)))
            curve.append(hypervolume(points))
        fig.add_trace(
            go.Scatter(x=[t.number for t in done], y=curve, mode="lines+markers", name="front")
        )
        note = f"log10 params in [{bounds[0]:.2f}, {bounds[1]:.2f}], reference (IoU 0, size 1)"
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


def _curves_figure(trials: Sequence[FrozenTrial], front: list[FrozenTrial]) -> go.Figure:
    on_front = {t.number for t in front}
    fig = go.Figure()
    for trial in trials:
        curve = sorted(trial.intermediate_values.items())
        if not curve:
            continue
        front_member = trial.number in on_front
        fig.add_trace(
            go.Scatter(
                x=[e for e, _ in curve],
                y=[v for _, v in curve],
                mode="lines+markers",
                name=f"#{trial.number} {trial.state.name.lower()}",
                line={
                    "color": "#d62728" if front_member else "#999",
                    "dash": "dot" if trial.state == TrialState.PRUNED else "solid",
                    "width": 2.5 if front_member else 1,
                },
                hovertext=trial.user_attrs.get("summary", ""),
            )
        )
    fig.update_layout(
        title="Learning curves: validation IoU per epoch (red: front, dotted: pruned)",
        xaxis={"title": "epoch", "dtick": 1},
        yaxis={"title": "validation IoU", "range": [0, 1]},
        height=400,
        template="plotly_white",
    )
    return fig


def _importance_figure(study: optuna.Study) -> go.Figure | str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. few trials, or an experimental evaluator
            importances = optuna.importance.get_param_importances(
                study,
                # PED-ANOVA explains low target values: which parameters lead to a high IoU.
                target=lambda t: -t.values[0],
                evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
            )
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        return f"Not available yet ({err})."
    if not importances:
        return "Not available yet: it needs completed trials that differ in their parameters."
    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    fig.update_layout(
        title="Parameter importances for validation IoU (PED-ANOVA)",
        xaxis={"title": "importance"},
        height=max(300, 28 * len(names) + 120),
        template="plotly_white",
    )
    return fig


def _overlays(study_dir: Path, front: list[FrozenTrial]) -> str:
    images = []
    for trial in sorted(front, key=lambda t: -t.values[0]):
        path = overlay_path(study_dir, trial.number)
        if path.exists():
            data = base64.b64encode(path.read_bytes()).decode()
            images.append(
                f'<figure><img alt="overlay of trial {trial.number}" '
                f'src="data:image/png;base64,{data}"><figcaption>trial {trial.number}: '
                f"{html.escape(trial.user_attrs.get('summary', ''))}</figcaption></figure>"
            )
    return "\n".join(images) or "<p>No overlay yet.</p>"


def _front_table(table: pd.DataFrame) -> str:
    """The front as HTML, validation and held-out scores under headers of their own; the
    held-out columns only where some member was scored on a test split."""
    scored = table["test_iou"].notna().any()
    columns = [
        c
        for c in FRONT_COLUMNS
        if c in table.columns and (scored or COLUMN_GROUPS.get(c) != HELD_OUT)
    ]
    shown = table[columns].copy()
    shown.columns = pd.MultiIndex.from_tuples([(COLUMN_GROUPS.get(c, ""), c) for c in columns])
    return shown.to_html(index=False, float_format="{:.4f}".format, na_rep="", border=0)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
td:last-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; }
figcaption { font-size: 0.8em; color: #555; max-width: 720px; }
img { max-width: 720px; }
"""


def render(study: optuna.Study, study_dir: Path) -> str:
    trials = study.get_trials(deepcopy=False)  # one read of the storage for every figure
    front = front_of(trials)
    states = {s.name: 0 for s in TrialState}
    for trial in trials:
        states[trial.state.name] += 1
    counts = ", ".join(f"{n} {name.lower()}" for name, n in states.items() if n)
    best = max((t.values[0] for t in front), default=None)
    figures: list[go.Figure | str] = [
        _front_figure(trials, front),
        _hypervolume_figure(trials),
        _curves_figure(trials, front),
        _importance_figure(study),
    ]
    parts, script_embedded = [], False
    for figure in figures:
        if isinstance(figure, str):
            parts.append(f"<h3>Parameter importances</h3><p>{html.escape(figure)}</p>")
            continue
        parts.append(figure.to_html(full_html=False, include_plotlyjs=not script_embedded))
        script_embedded = True
    front_table = _front_table(trials_table(front, study.user_attrs.get(TEST_SCORES_ATTR, {})))
    dataset = study.user_attrs.get("data_config", {}).get("path", "?")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary_line = (
        f"{counts or 'no trials'}; best validation IoU {best:.4f}; front of {len(front)}"
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
{front_table}
<h2>Validation overlays of the front (green: ground truth, red: prediction)</h2>
{_overlays(study_dir, front)}
</body></html>
"""


CURVES_GRAPH_ID = "learning-curves"


def publish_curves(study: optuna.Study) -> None:
    """Show the learning curves on the study's page in optuna-dashboard, which plots
    intermediate values for single-objective studies only."""
    trials = study.get_trials(deepcopy=False)
    figure = _curves_figure(trials, front_of(trials))
    save_plotly_graph_object(study, figure, graph_object_id=CURVES_GRAPH_ID)


def write_report(study: optuna.Study, study_dir: Path) -> Path:
    path = study_dir / REPORT_FILE
    text = render(study, study_dir)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nas.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/unet")
    parser.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    study = load_results_study(args.results, args.storage)
    print(f"wrote {write_report(study, args.results)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
