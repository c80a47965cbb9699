"""results/<study>/report.html: the search at a glance, in one file that needs no network.

The figures (`report_figures.py`: the Pareto front, hypervolume, learning curves, parameter
importances), the front as a table, the rungs' agreement, the cross-validation and the
validation overlays of the front's members. Plotly's JavaScript is embedded once, so the file
opens anywhere. Rewritten after every trial by `nas run`, and on demand by `nas report`.
Derived from the study alone, like the CSV files.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.staging import atomic_write
from nas.search.objectives import FRONT_COLUMNS, MEASURED_ONLY_WHEN_ASKED
from nas.search.report_figures import (
    curves_figure,
    front_figure,
    hypervolume_figure,
    importance_figure,
)

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    import plotly.graph_objects as go
    from optuna.trial import FrozenTrial

    from nas.search.scoring import Interval


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

    from nas.search.companions import (
        ensemble_rows,
        find_crossval_study,
        recorded,
        summary_rows,
    )

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


def _state_counts(trials: Sequence[FrozenTrial]) -> str:
    """How many trials are in each state, e.g. "30 complete, 6 pruned"."""
    from optuna.trial import TrialState

    states = {s.name: 0 for s in TrialState}
    for trial in trials:
        states[trial.state.name] += 1
    return ", ".join(f"{n} {name.lower()}" for name, n in states.items() if n)


def _summary_line(
    trials: Sequence[FrozenTrial], front: list[FrozenTrial], objectives: Sequence[str], score: str
) -> str:
    """The page's first line: the trials by state, the objectives, the best score, the front."""
    from nas.search.objectives import OBJECTIVES
    from nas.search.record import TrialRecord

    counts = _state_counts(trials)
    best = max((TrialRecord.of(t).quantity(score) for t in front), default=None)
    return (
        f"{counts or 'no trials'}; objectives {', '.join(objectives)}; best "
        f"{OBJECTIVES[score].label} {best:.4f}; front of {len(front)}"
        if best is not None
        else f"{counts or 'no trials'}; no completed trial yet"
    )


def _figures(
    study: optuna.Study,
    trials: Sequence[FrozenTrial],
    front: list[FrozenTrial],
    objectives: Sequence[str],
    intervals: dict[int, Interval],
) -> str:
    """The figures as HTML, Plotly's JavaScript embedded with the first of them; parameter
    importances as a line where they cannot be computed yet."""
    from nas.search.objectives import OBJECTIVES, curve_metric
    from nas.search.results import panels

    score, metric = panels(objectives)[0], curve_metric(objectives)
    figures: list[go.Figure | str] = [
        front_figure(trials, front, objectives, {n: i.se for n, i in intervals.items()}),
        hypervolume_figure(trials, objectives),
        curves_figure(trials, front, OBJECTIVES[metric].label),
        importance_figure(study, score),
    ]
    parts, script_embedded = [], False
    for figure in figures:
        if isinstance(figure, str):
            parts.append(f"<h3>Parameter importances</h3><p>{html.escape(figure)}</p>")
            continue
        parts.append(figure.to_html(full_html=False, include_plotlyjs=not script_embedded))
        script_embedded = True
    return "".join(parts)


def render(
    study: optuna.Study,
    study_dir: Path,
    trials: Sequence[FrozenTrial] | None = None,
    front: list[FrozenTrial] | None = None,
) -> str:
    """`trials` and their `front`: as the caller has just read and computed them."""
    from nas.search.objectives import curve_metric
    from nas.search.record import QUANTITY_ATTRS, StudyRecord, study_objectives
    from nas.search.results import front_table as front_table_of
    from nas.search.results import panels
    from nas.search.scoring import front_intervals, front_of

    trials = study.get_trials(deepcopy=False) if trials is None else trials
    objectives = study_objectives(study).names
    score, metric = panels(objectives)[0], curve_metric(objectives)
    front = front_of(trials, objectives) if front is None else front
    summary_line = _summary_line(trials, front, objectives, score)
    recorded = StudyRecord.of(study)
    intervals = front_intervals(study, front)
    figures = _figures(study, trials, front, objectives, intervals)
    table = front_table_of(front, recorded.test_scores, intervals, recorded.volume_scores, metric)
    front_table = _front_table(table)
    column = QUANTITY_ATTRS[metric]
    dataset = recorded.dataset()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>nas report: {html.escape(study.study_name)}</title><style>{STYLE}</style></head>
<body>
<h1>Study {html.escape(study.study_name)}</h1>
<p>{html.escape(summary_line)}. Data: {html.escape(str(dataset))}. Written {created}.</p>
{figures}
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
