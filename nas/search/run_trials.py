"""The trials a search run trains in this process: Optuna's loop run until the schedule has
no more work or the time is up, a trial no live worker owns rerun, a progress bar and a line
per finished trial, and what a Ctrl-C leaves recorded as interrupted."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nas.search.interrupts import Interrupted
from nas.search.run_results import refresh, trial_line

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from nas.search.console import RunLog, RunProgress
    from nas.search.run_setup import RunSetup
    from nas.search.schedule.policy import Schedule
    from nas.search.space import StudySection


def run_trials(
    args: argparse.Namespace, log: RunLog, setup: RunSetup, study: optuna.Study
) -> int | None:
    """Run trials in this process until the schedule has no more work, with a progress bar
    and a line per trial; the exit code when interrupted, else None."""
    from nas.search.candidate_state import TrainingData
    from nas.search.console import RunProgress
    from nas.search.trial import make_objective
    from nas.search.trial_files import trial_files

    space, study_dir, study_cfg = setup.space, setup.study_dir, setup.space.study
    is_worker = args.worker_index is not None
    data = TrainingData(setup.train_cases, setup.val_cases, setup.dataset.scheme,
                        space.data.slicing, args.data_workers)  # fmt: skip
    objective = make_objective(space, data, setup.dataset.in_channels, setup.device, study_dir,
                               setup.schedule, trial_files(study, study_dir))  # fmt: skip
    prefix = f"[worker {args.worker_index}] " if is_worker else ""
    limits = (study_cfg.n_trials, study_cfg.timeout, setup.schedule.budget_steps, setup.start)
    bar = RunProgress(*limits, disable=is_worker or args.quiet, stream=log.console_err)
    progress = _TrialProgress(bar, study_dir, prefix, args.quiet)
    progress.show(study)
    with contextlib.closing(bar):
        try:
            _optimize(study, objective, study_cfg, setup.schedule, [progress.after_trial], prefix)
        except Interrupted as err:
            _abandon_own_trials(study)
            refresh(study, study_dir)
            print(prefix + "interrupted: finished trials are kept; run the same command "
                  "to continue")  # fmt: skip
            return err.exit_code
    return None


@dataclass(frozen=True)
class _TrialProgress:
    """After each trial: the results folder refreshed, the trial's line, the bar moved."""

    bar: RunProgress
    study_dir: Path
    prefix: str
    quiet: bool

    def show(self, study: optuna.Study) -> None:
        from nas.search.schedule.budget import spending
        from nas.search.study import settled_count

        trials = study.get_trials(deepcopy=False)  # one read for both counts
        self.bar.update(settled_count(trials), spending(trials).steps)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        refresh(study, self.study_dir)
        if not self.quiet:
            self.bar.write(self.prefix + trial_line(trial))
        self.show(study)


def _abandon_own_trials(study: optuna.Study) -> None:
    """Record as interrupted any trial of this process that an interrupt left RUNNING (one
    that arrived in Optuna's own code, outside the objective)."""
    from optuna.trial import TrialState

    from nas.search.liveness import fail_and_retry, worker_id
    from nas.search.record import TrialRecord
    from nas.search.study import INTERRUPTED

    me = worker_id()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if TrialRecord.of(trial).worker == me:  # rerun by the next run, as any interrupted
            fail_and_retry(study, trial, INTERRUPTED, retries=0, by_number={})


def _optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], list[float]],
    study_cfg: StudySection,
    schedule: Schedule,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
    prefix: str,
) -> None:
    """Run trials until the schedule has no more work (new candidates, promotions), or the
    timeout. The run does not end while a trial that no live worker owns is RUNNING: such a
    trial is failed and rerun here, after its heartbeat goes stale if its worker was on
    another host."""
    from optuna.trial import TrialState

    from nas.search.liveness import describe_waiting, settle_orphans
    from nas.search.schedule.policy import StopAtTotal, enqueue_promotion, has_work
    from nas.training.fit import CandidateFailed

    said_waiting = False
    while True:
        left = schedule.time_left()
        if left is not None and left <= 0:
            return
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            enqueue_promotion(study, schedule)
        if has_work(study.get_trials(deepcopy=False), schedule):
            study.optimize(
                objective,
                timeout=left,
                catch=(CandidateFailed,),
                callbacks=[*callbacks, StopAtTotal(schedule)],
            )
        settled = settle_orphans(study, study_cfg.heartbeat)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            continue  # reruns of failed orphans (or another worker's enqueued trials)
        if not settled.elsewhere or not has_work(study.get_trials(deepcopy=False), schedule):
            return
        if not said_waiting:
            print(prefix + describe_waiting(settled.elsewhere, study_cfg.heartbeat.grace_period),
                  flush=True)  # fmt: skip
            said_waiting = True
        time.sleep(min(5.0, study_cfg.heartbeat.heartbeat_interval))
