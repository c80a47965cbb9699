"""The search's one score, its one front, and how noisy each score is.

A candidate's score is its smoothed validation IoU at the fidelity it reached: the mean of
its last SMOOTHING_EPOCHS validations (`search_score`). A trial stores it as its IoU value, so
the rungs, the endgame, the sampler, the pruner, pareto.csv, the report and `export --best`
all read the same number. A study whose score objective is `case_dice` does all of this on
per-case Dice instead (`objectives.curve_metric`: its curves hold case Dice, its trials store
the smoothed value as their case Dice). The front is computed in one place (`front_of`):
the completed, feasible trials no other dominates, each candidate represented by its latest
trial.

Validation while searching is on a fixed set of patches per validation case
(`ValidationConfig`, nas/validation/validate.py), after the epochs decisions read
(`decision_epochs`),
and its counts are kept per case, so a score's noise over the validation cases is estimated
by the bootstrap (`interval`): the cases are resampled with replacement and the score taken
again. `one_standard_error_choice` applies the one-standard-error rule of model selection:
the smallest member whose score is within one standard error of the best score, the error
of its difference from the best with the cases resampled together (`difference_error`). Pure
functions over Optuna's FrozenTrial records (nas/search/record.py); no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import spearmanr

from nas.search.objectives import (
    DEFAULT_OBJECTIVES,
    OBJECTIVES,
    as_minimised,
    curve_metric,
    non_dominated,
)
from nas.search.record import StudyRecord, TrialRecord, records, study_objectives
from nas.validation.metrics import case_dice_from_counts

# How many of the last validations a score averages: a single epoch's IoU on two or three
# validation cases swings by 0.2 for a small network early in training (the default run
# measured it), so the rungs rank, and "still learning" compares, the mean of the last ones.
SMOOTHING_EPOCHS = 2


class ValidationConfig(BaseModel):
    """What the search's validation costs: patches_per_case fixed patches of each validation
    case (a share foreground_fraction of them centred on foreground), predicted after the
    epochs a decision reads (the last SMOOTHING_EPOCHS before each rung or extension end) and,
    with `every`, after every `every`-th epoch too (the curves optuna-dashboard draws);
    bootstrap: resamples of the validation cases behind each front member's interval;
    cases: validate on this many of the fold's validation cases, drawn once with the study's
    seed (None: all of them), so that a large fold costs what a small one does."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cases: int | None = Field(None, ge=1, le=100_000)
    patches_per_case: int = Field(16, ge=1, le=4096)
    foreground_fraction: float = Field(0.5, ge=0.0, le=1.0)
    every: int | None = Field(None, ge=1)
    bootstrap: int = Field(1000, ge=1, le=100_000)


def search_validation_cases(cases: Sequence[Any], count: int | None, seed: int) -> list[Any]:
    """The validation cases a search validates on: `count` of `cases` drawn with `seed`, in
    their order (all of them for None). Raises ValueError when the fold has fewer."""
    if count is None:
        return list(cases)
    if count > len(cases):
        raise ValueError(f"is {count}, but the fold has {len(cases)} validation cases")
    chosen = np.random.default_rng(seed).choice(len(cases), count, replace=False)
    return [cases[index] for index in sorted(chosen)]


def smoothed(curve: Mapping[int, float], epoch: int) -> float:
    """The mean validation score (IoU, or case Dice: `curve_metric`) of the last
    SMOOTHING_EPOCHS epochs up to `epoch` that the curve holds (`epoch` itself must be one)."""
    values = [curve[e] for e in range(epoch - SMOOTHING_EPOCHS + 1, epoch + 1) if e in curve]
    return sum(values) / len(values)


def search_score(curve: Mapping[int, float], epoch: int) -> float:
    """A candidate's score at `epoch`: smoothed at the last validated epoch up to it."""
    at = max((e for e in curve if e <= epoch), default=min(curve))
    return smoothed(curve, at)


def decision_epochs(start: int, end: int, every: int | None) -> frozenset[int]:
    """The epochs of a segment (start + 1 .. end) after which the search validates: the
    window its end's score averages, and every `every`-th epoch."""
    window = range(max(start + 1, end - SMOOTHING_EPOCHS + 1), end + 1)
    periodic = range(every * (start // every + 1), end + 1, every) if every else ()
    return frozenset([*window, *periodic])


def kept_counts(counts: Mapping[int, Sequence], epoch: int) -> dict[str, list]:
    """The per-case counts a trial keeps: those of its last SMOOTHING_EPOCHS validations up
    to `epoch`, by epoch (as text, for JSON)."""
    window = [e for e in sorted(counts) if e <= epoch][-SMOOTHING_EPOCHS:]
    return {str(e): [list(map(list, case)) for case in counts[e]] for e in window}


@dataclass(frozen=True)
class Interval:
    score: float
    se: float  # the bootstrap's standard error over validation cases (0: one case, or none kept)
    # The score on each bootstrap resample of the cases: the same resamples for every trial
    # of a study (one seed, the same cases), so two members' differences can be paired.
    resampled: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def low(self) -> float:
        return self.score - self.se

    @property
    def high(self) -> float:
        return self.score + self.se


def interval(
    trial: FrozenTrial, resamples: int = 1000, seed: int = 0, metric: str = "iou"
) -> Interval | None:
    """The trial's score (its `metric`, what its curve holds: `objectives.curve_metric`) and
    its standard error over its validation cases, by the bootstrap over the per-case counts
    of its last validations; None where it kept none (a study from before they were kept, or
    whole-case validation)."""
    record = TrialRecord.of(trial)
    score = record.quantity(metric)
    if score is None or not record.val_case_counts:
        return None
    counts = np.array([record.val_case_counts[e] for e in sorted(record.val_case_counts, key=int)],
                      dtype=float)  # fmt: skip  # (epochs, cases, 3, K)
    if counts.ndim != 4 or counts.shape[1] == 0:
        return None
    n_cases = counts.shape[1]
    picks = np.random.default_rng(seed).integers(n_cases, size=(resamples, n_cases))
    scores = resampled_scores(counts[:, picks], metric).mean(axis=0)  # over the window's epochs
    se = float(scores.std(ddof=1)) if resamples > 1 and n_cases > 1 else 0.0
    return Interval(score, se, scores)


def resampled_scores(counts: np.ndarray, metric: str) -> np.ndarray:
    """`metric` of per-case counts (epochs, resamples, cases, 3, K): (epochs, resamples).
    IoU pools each resample's cases before the ratio, then averages over classes; case Dice
    averages each case's Dice (`nas.validation.metrics.case_dice_from_counts`)."""
    if metric == "case_dice":
        return case_dice_from_counts(counts)
    pooled = counts.sum(axis=2)  # (epochs, resamples, 3, K)
    intersection, predicted, truth = pooled[:, :, 0], pooled[:, :, 1], pooled[:, :, 2]
    union = predicted + truth - intersection
    iou = np.where(union > 0, intersection / np.maximum(union, 1), 1.0)
    return iou.mean(axis=2)  # over classes


def difference_error(best: Interval | None, member: Interval | None) -> float:
    """The standard error of `best`'s score minus `member`'s over the validation cases, the
    cases resampled together (paired): what is hard for one member is hard for the other, and
    that shared part of each member's own error says nothing about which is better. Unpaired
    (the member's own error) where the two were not scored on the same resamples."""
    if member is None:
        return 0.0
    if best is None or best.resampled is None or member.resampled is None:
        return member.se
    if best.resampled.shape != member.resampled.shape or len(member.resampled) < 2:
        return member.se
    return float((best.resampled - member.resampled).std(ddof=1))


def resamples(study: optuna.Study) -> int:
    """The bootstrap's resamples for `study`'s intervals, as its last run set them."""
    recorded = StudyRecord.of(study).validation or {}
    return int(recorded.get("bootstrap", ValidationConfig().bootstrap))


def front_intervals(study: optuna.Study, front: Sequence[FrozenTrial]) -> dict[int, Interval]:
    """Each front member's interval of the study's search score (`objectives.curve_metric`),
    by trial number (members without counts left out)."""
    count, metric = resamples(study), curve_metric(study_objectives(study).names)
    found = {t.number: interval(t, count, metric=metric) for t in front}
    return {n: i for n, i in found.items() if i is not None}


def best_member(members: Sequence[tuple]) -> tuple:
    """Of members (trial, score, ..., params): the highest score, the smaller on a tie."""
    return max(members, key=lambda m: (m[1], -m[-1]))


def one_standard_error_choice(
    members: Sequence[tuple[int, float, float, int]],
) -> tuple[int, int]:
    """Of members (trial, score, standard error of its difference from the best, params):
    (the best, the chosen). The best scores highest (the smaller on a tie); the chosen is the
    smallest member whose score plus that error reaches the best's score (the
    one-standard-error rule, on paired differences: `difference_error`)."""
    best = best_member(members)
    reaching = [m for m in members if m[1] + m[2] >= best[1]]
    chosen = min(reaching, key=lambda m: (m[3], -m[1]))
    return best[0], chosen[0]


def superseded_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Completed trials whose candidate a later trial continued and completed."""
    completed = (r for r in records(trials) if r.complete)
    return {int(r.continues) for r in completed if r.continues is not None}


def front_of(
    trials: Sequence[FrozenTrial], objectives: Sequence[str] = DEFAULT_OBJECTIVES
) -> list[FrozenTrial]:
    """The one front: the non-dominated completed, feasible trials among `trials` over
    `objectives` (as Optuna's best_trials: equal values are all kept), sorted by the first
    objective to minimise, then best score first. A candidate that a later trial trained
    further is represented by that trial only (each member at the fidelity it reached)."""
    superseded = superseded_numbers(trials)
    completed = [
        (t, r)
        for t, r in zip(trials, records(trials), strict=True)
        if r.complete and r.feasible and t.number not in superseded
        and all(r.quantity(n) is not None for n in objectives)  # (not a trial nas wrote)
    ]  # fmt: skip
    if not completed:
        return []
    points = np.array([[r.quantity(n) for n in objectives] for _, r in completed], dtype=float)
    mask = non_dominated(points, objectives)
    front = [pair for pair, keep in zip(completed, mask, strict=True) if keep]
    low = as_minimised(points[mask], objectives)
    order = sorted(
        range(len(front)), key=lambda i: (*_cost_first(low[i], objectives), front[i][0].number)
    )
    return [front[i][0] for i in order]


def joins_front(
    trials: Sequence[FrozenTrial], number: int, values: Sequence[float], objectives: Sequence[str]
) -> bool:
    """Whether trial `number`, completing with `values`, is on the front `front_of` will
    report: the trial it continues (if any) no longer counts, as it will be superseded."""
    parent = next((TrialRecord.of(t).continues for t in trials if t.number == number), None)
    left_out = {number, parent, *superseded_numbers(trials)}
    others = [r for r in records(trials)
              if r.complete and r.feasible and r.number not in left_out
              and all(r.quantity(n) is not None for n in objectives)]  # fmt: skip
    points = np.array([[r.quantity(n) for n in objectives] for r in others] + [list(values)])
    return bool(non_dominated(points, objectives)[-1])


def _cost_first(low: np.ndarray, objectives: Sequence[str]) -> list[float]:
    """A front member's sort key: its minimised objectives, those to minimise first."""
    costs = [i for i, n in enumerate(objectives) if not OBJECTIVES[n].maximise]
    scores = [i for i, n in enumerate(objectives) if OBJECTIVES[n].maximise]
    return [float(low[i]) for i in [*costs, *scores]]


def rung_correlations(trials: Sequence[FrozenTrial]) -> list[dict[str, Any]]:
    """For each pair of consecutive rungs (epochs): how many candidates reached both, and the
    rank correlation of their scores at the two (`rank_correlation`): how well a rung
    foretells the next, the first cut's above all."""
    curves = _latest_curves(trials)
    rungs = sorted({r for t in trials for r in TrialRecord.of(t).rungs})
    rows = []
    for lower, upper in zip(rungs, rungs[1:], strict=False):
        pairs = rung_pairs(curves, lower, upper)
        rows.append({"lower": lower, "upper": upper, "candidates": len(pairs),
                     "spearman": rank_correlation(pairs)})  # fmt: skip
    return rows


def rung_pairs(
    curves: Sequence[Mapping[int, float]], lower: int, upper: int
) -> list[tuple[float, float]]:
    """(score at `lower`, score at `upper`) of each curve that holds both."""
    return [(smoothed(c, lower), smoothed(c, upper)) for c in curves if lower in c and upper in c]


def _latest_curves(trials: Sequence[FrozenTrial]) -> list[Mapping[int, float]]:
    """The learning curve of each candidate's latest finished trial (across its rungs)."""
    latest: dict[int, FrozenTrial] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and trial.intermediate_values:
            latest[TrialRecord.of(trial).lineage_root] = trial
    return [t.intermediate_values for t in latest.values()]


# The first cut is raised (new candidates train to the second rung before they are first
# ranked) when its ranking and the next rung's agree less than this, over at least MIN_PAIRS
# candidates: on real MRI the 30-step ranking foretold the 300-step one at Spearman 0.32, the
# 100-step ranking at 0.62.
WEAK_FIRST_CUT = 0.5
MIN_PAIRS = 6


def first_cut_is_weak(trials: Sequence[FrozenTrial], rungs: Sequence[int]) -> bool:
    """Whether the lowest rung's ranking foretells the next rung's weakly: Spearman below
    WEAK_FIRST_CUT over at least MIN_PAIRS candidates (with at least three rungs, so that
    something is left to cut). Once a new candidate was started past it, it stays so."""
    if len(rungs) < 3:
        return False
    new = [r for r in records(trials) if r.continues is None and r.rungs]
    if any(r.rungs[0] == rungs[1] for r in new):
        return True
    pairs = rung_pairs(_latest_curves(trials), rungs[0], rungs[1])
    rho = rank_correlation(pairs)
    return len(pairs) >= MIN_PAIRS and rho is not None and rho < WEAK_FIRST_CUT


def raised_first_cut(trials: Sequence[FrozenTrial]) -> tuple[int, int] | None:
    """(the first new trial that skipped the lowest rung, the rung it trained to first), if
    any did (`first_cut_is_weak`)."""
    new = [r for r in records(trials) if r.continues is None and r.rungs]
    lowest = min((r.rungs[0] for r in new), default=None)
    skipped = [r for r in new if r.rungs[0] != lowest]
    return (skipped[0].number, skipped[0].rungs[0]) if skipped else None


def rank_correlation(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Spearman's rank correlation of (score at one rung, score at the next) over the
    candidates that reached both; None below three pairs or where either side is constant."""
    if len(pairs) < 3:
        return None
    lower, upper = zip(*pairs, strict=True)
    if len(set(lower)) == 1 or len(set(upper)) == 1:
        return None
    value = float(spearmanr(lower, upper).statistic)
    return None if math.isnan(value) else value
