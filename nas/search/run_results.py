"""What a search run leaves and says: results/<study>/ rewritten from the study after each
trial, a finished trial in one line, the front scored after the search on whole validation
volumes and held-out cases (never used to select), and the closing summary."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.locking import file_lock

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from nas.search.run_hooks import RunHooks
    from nas.search.run_setup import RunSetup


def trial_line(trial: FrozenTrial) -> str:
    from nas.search.record import TrialRecord

    record = TrialRecord.of(trial)
    dims = record.spatial_dims or "?"
    params = f"{record.n_params:>10,}" if record.n_params is not None else " " * 10
    iou = f"{record.iou:.3f}" if record.iou is not None else "  -  "
    epochs = record.epochs_run
    steps = record.fidelity_steps
    line = (
        f"trial {trial.number:3d}  {dims}D  params {params}  IoU {iou}  "
        f"epochs {epochs if epochs is not None else '-':>3}  "
        f"steps {steps if steps is not None else '-':>5}  "
        f"{record.seconds or 0.0:6.1f}s  {trial.state.name}"
    )
    if record.quantity("latency_ms") is not None:
        line += f"  {record.quantity('latency_ms'):.2f} ms"
    if record.continues is not None:
        line += f"  (continues trial {record.continues})"
    if record.rejected is not None:
        line += f"  (rejected: {record.rejected})"
    elif record.fail_reason is not None:
        line += f"  ({record.fail_reason})"
    return line


def refresh(study: optuna.Study, study_dir: Path) -> list[FrozenTrial] | None:
    """Rewrite results/ from the study (the tables, report.html and the dashboard's learning
    curves); one worker at a time, each file renamed into place. A failure (a
    full disk, say) is reported and the search goes on: the study is intact and the next
    refresh, or `nas.report`, writes the views again."""
    from nas.search.report import write_report
    from nas.search.report_figures import publish_curves
    from nas.search.results import write_results

    try:
        with file_lock(study_dir / ".results.lock"):
            trials = study.get_trials(deepcopy=False)  # one read for every view
            front = write_results(study, study_dir, trials)
            write_report(study, study_dir, trials, front)
            publish_curves(study, front)
    except Exception as err:
        print(f"warning: could not rewrite {study_dir}/ ({type(err).__name__}: {err}); "
              "the study is intact", file=sys.stderr, flush=True)  # fmt: skip
        return None
    return front


def score_front(study: optuna.Study, setup: RunSetup, hooks: RunHooks) -> None:
    """The front's members on the whole validation volumes (beside the patch score the
    search decided on), and on the held-out test cases, for the tables and the report; they
    are never used to select. Each says how long it took."""
    from nas.search.candidate_state import TrainingData
    from nas.search.record import write_study
    from nas.search.results import pareto_front
    from nas.search.scoring import rung_correlations

    front, split = pareto_front(study), setup.test_split
    write_study(study, rung_correlations=rung_correlations(study.get_trials(deepcopy=False)))
    data = TrainingData(setup.train_cases, setup.val_cases, setup.dataset.scheme,
                        setup.space.data.slicing)  # fmt: skip
    try:
        seconds = hooks.score_validation_volumes(study, setup.study_dir, front, data, setup.device)
        print(f"scored {len(front)} front member(s) on {len(setup.val_cases)} whole validation "
              f"volume(s) in {seconds:.1f} s", flush=True)  # fmt: skip
        if split is not None:
            start = time.perf_counter()
            hooks.score_test_cases(study, setup.study_dir, front, split, setup.device)
            print(f"scored {len(front)} front member(s) on {len(split.cases)} held-out test "
                  f"case(s) in {time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    except Exception as err:  # the search's results stand without them
        print(f"warning: could not score the front after the search "
              f"({type(err).__name__}: {err})", file=sys.stderr, flush=True)  # fmt: skip


def summary(
    study: optuna.Study, study_dir: Path, front: list[FrozenTrial], args: argparse.Namespace
) -> None:
    from optuna.trial import TrialState

    from nas.search.record import StudyRecord
    from nas.search.results import undertrained_numbers
    from nas.search.scoring import raised_first_cut
    from nas.search.storage import redact

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    print(f"{len(completed)} completed trials; Pareto front of {len(front)}:")
    marked = undertrained_numbers(front)
    for trial in front:
        far_less = "  (trained far less than a front member of similar size)"
        print("  " + trial_line(trial) + (far_less if trial.number in marked else ""))
    for row in StudyRecord.of(study).rung_correlations:
        if row["spearman"] is not None:
            print(f"rung {row['lower']} foretold rung {row['upper']} with Spearman "
                  f"{row['spearman']:.2f} over {row['candidates']} candidates")  # fmt: skip
    raised = raised_first_cut(study.get_trials(deepcopy=False))
    if raised is not None:
        print(
            f"the first cut foretold the next rung weakly: new candidates from trial "
            f"{raised[0]} on trained to epoch {raised[1]} before their first ranking"
        )
    print(
        f"results in {study_dir}/ (report.html, trials.csv, pareto.csv, pareto.png, "
        "checkpoints/, artifacts/)"
    )
    custom = f" --storage {redact(args.storage)}" if args.storage else ""
    print(f"inspect with: python -m nas.dashboard {study_dir}{custom}")
