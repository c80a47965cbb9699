"""Which front member to take, and why: the one-standard-error rule over validation cases (the
smallest member whose IoU is within one standard error of the best), the best score, or a
trial named; cross-validated scores where the members were cross-validated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nas.core.errors import NasError

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


def choose_trial(
    study: optuna.Study,
    trial: int | None,
    max_params: int | None,
    by: str = "search",
    best_score: bool = False,
) -> FrozenTrial:
    """--trial N, or the best (the smaller on a tie) with at most `max_params` parameters:
    of the front by the search's score, or of the cross-validated members by their mean.
    --best on the front (no `max_params`, not `best_score`): the one-standard-error rule
    (`one_standard_error`)."""
    from optuna.trial import TrialState

    if best_score and by == "cv":
        raise NasError("--best-score", "ranks the search's front; with --by cv use --best")
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if trial is not None:
        if by != "search":
            raise NasError("--by", "--trial names the trial; --by chooses for --best")
        if trial not in by_number:
            raise NasError("--trial", f"study {study.study_name!r} has no trial {trial}")
        chosen = by_number[trial]
        if chosen.state != TrialState.COMPLETE:
            raise NasError("--trial", f"trial {trial} is {chosen.state.name}, not COMPLETE")
        return chosen

    from nas.search.record import study_objectives

    score = study_objectives(study).score.name  # IoU unless the study ranks on (case) Dice
    candidates = _cv_candidates(study, score) if by == "cv" else _front_candidates(study, score)
    if max_params is not None:
        fitting = [c for c in candidates if c[2] <= max_params]
        if not fitting:
            smallest = min(c[2] for c in candidates)
            among = "cross-validated member" if by == "cv" else "front member"
            raise NasError(
                "--max-params",
                f"no {among} has at most {max_params:,} parameters (the smallest has {smallest:,})",
            )
        candidates = fitting
    elif by == "search" and not best_score:
        return by_number[one_standard_error(study)[1]]
    number = max(candidates, key=lambda c: (c[1], -c[2]))[0]
    return by_number[number]


def one_standard_error(study: optuna.Study) -> tuple[int, int, dict]:
    """(the front's best by score, the member the one-standard-error rule chooses, the
    front's intervals by trial) over the search's one score; each member's error is that of
    its difference from the best, the validation cases resampled together."""
    from nas.search.objectives import curve_metric, score_of
    from nas.search.record import TrialRecord, study_objectives
    from nas.search.results import pareto_front
    from nas.search.scoring import (
        best_member,
        difference_error,
        front_intervals,
        one_standard_error_choice,
    )

    front = pareto_front(study)
    if not front:
        raise NasError(study.study_name, "has no completed trial to export")
    names = study_objectives(study).names
    score = score_of(names)
    # The intervals are of what the curves hold: of the score unless the study ranks on Dice.
    intervals = front_intervals(study, front) if score == curve_metric(names) else {}
    records = {trial.number: TrialRecord.of(trial) for trial in front}
    scored = [(n, r.quantity(score), r.n_params or 0) for n, r in records.items()]
    top = intervals.get(best_member(scored)[0])
    members = [(n, value, difference_error(top, intervals.get(n)), params)
               for n, value, params in scored]  # fmt: skip
    best, chosen = one_standard_error_choice(members)
    return best, chosen, intervals


def _front_candidates(study: optuna.Study, score: str) -> list[tuple[int, float, int]]:
    """(trial, the search's score, params) of each front member."""
    from nas.search.record import TrialRecord
    from nas.search.results import pareto_front

    front = pareto_front(study)
    if not front:
        raise NasError(study.study_name, "has no completed trial to export")
    records = [(t.number, TrialRecord.of(t)) for t in front]
    return [(n, r.quantity(score), r.n_params or 0) for n, r in records]


def _cv_candidates(study: optuna.Study, score: str) -> list[tuple[int, float, int]]:
    """(trial, mean over the folds, params) of each cross-validated member."""
    from nas.search.companions import find_crossval_study, summary_rows

    crossval = find_crossval_study(study)
    rows = summary_rows(crossval, study) if crossval is not None else []
    if not rows:
        raise NasError(
            "--by cv",
            f"study {study.study_name!r} has no cross-validation: run nas retrain RESULTS "
            "--folds all first",
        )
    return [(r["trial"], r[f"cv_{score}_mean"], r["n_params"]) for r in rows]
