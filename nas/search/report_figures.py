"""report.html's figures, and the learning curves optuna-dashboard shows: the Pareto front
(hover shows the architecture), the hypervolume after each trial, the learning curves and the
parameter importances, each a Plotly figure drawn from the study's trials alone. Also the
hypervolume's normalisation, which the benchmarks share.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import optuna
    import plotly.graph_objects as go
    from optuna.trial import FrozenTrial

    from nas.search.record import TrialRecord


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


def _off_front(trials: Sequence[FrozenTrial], front: list[FrozenTrial]) -> dict:
    """The trials the front figure draws grey, by legend name: completed, and pruned with the
    last IoU they reported."""
    from optuna.trial import TrialState

    from nas.search.record import records

    on_front = {t.number for t in front}
    every = records(trials)
    return {
        "completed": [r for r in every if r.complete and r.number not in on_front],
        "pruned (last IoU)": [
            r for r in every
            if r.state == TrialState.PRUNED and r.iou is not None and r.number not in on_front
        ],
    }  # fmt: skip


def _off_front_trace(
    name: str, group: Sequence[TrialRecord], other: str, score: str,
    objectives: Sequence[str], legend: bool,
) -> go.Scatter:  # fmt: skip
    import numpy as np
    import plotly.graph_objects as go

    return go.Scatter(  # arrays: plotly checks them whole, not value by value
        x=np.array([r.quantity(other) for r in group], dtype=float),
        y=np.array([r.quantity(score) for r in group], dtype=float),
        mode="markers",
        name=name,
        legendgroup=name,
        showlegend=legend,
        marker={
            "color": "#999" if name == "completed" else "#ccc",
            "symbol": "circle" if name == "completed" else "circle-open",
            "size": 8,
        },
        text=[_hover(r, objectives) for r in group],
        hoverinfo="text",
    )


def _front_trace(
    members: Sequence[TrialRecord], other: str, score: str, objectives: Sequence[str],
    errors: Mapping[int, float], legend: bool,
) -> go.Scatter:  # fmt: skip
    """The front's members, in the order of `other`, with their errors as error bars where
    `score` is the one the errors belong to."""
    import plotly.graph_objects as go

    from nas.search.objectives import curve_metric

    by_x = sorted(members, key=lambda r: r.quantity(other))
    return go.Scatter(
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
        showlegend=legend,
        text=[_hover(r, objectives) for r in by_x],
        hoverinfo="text",
    )


def front_figure(
    trials: Sequence[FrozenTrial],
    front: list[FrozenTrial],
    objectives: Sequence[str],
    errors: Mapping[int, float],
) -> go.Figure:
    """The score against each other objective, one panel each (two objectives: one); the
    front's members with `errors` (their score's standard error, by trial) as error bars."""
    from plotly.subplots import make_subplots

    from nas.search.objectives import OBJECTIVES
    from nas.search.record import TrialRecord
    from nas.search.results import panels

    score, others = panels(objectives)
    groups = _off_front(trials, front)
    members = [TrialRecord.of(t) for t in front]
    fig = make_subplots(rows=1, cols=len(others))
    for column, other in enumerate(others, start=1):
        for name, group in groups.items():
            group = [r for r in group if r.quantity(other) is not None]
            fig.add_trace(_off_front_trace(name, group, other, score, objectives, column == 1),
                          row=1, col=column)  # fmt: skip
        fig.add_trace(_front_trace(members, other, score, objectives, errors, column == 1),
                      row=1, col=column)  # fmt: skip
        log = not OBJECTIVES[other].maximise
        fig.update_xaxes(title_text=OBJECTIVES[other].label, type="log" if log else None,
                         row=1, col=column)  # fmt: skip
        fig.update_yaxes(title_text=OBJECTIVES[score].label, range=[0, 1], row=1, col=column)
    names = " vs ".join(OBJECTIVES[n].label for n in [score, *others])
    fig.update_layout(title=f"Pareto front: {names}", height=450, template="plotly_white")
    return fig


def hypervolume_figure(trials: Sequence[FrozenTrial], objectives: Sequence[str]) -> go.Figure:
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


def curves_figure(
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


def importance_figure(study: optuna.Study, score: str) -> go.Figure | str:
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
    figure = curves_figure(front, front, OBJECTIVES[curve_metric(objectives)].label)
    save_plotly_graph_object(study, figure, graph_object_id=CURVES_GRAPH_ID)
