"""One search run, top to bottom: set up (space, schedule, cases, device), open the study,
run the trials (here, or in `--workers` processes), score the front after the search,
rewrite results/<study>/ and print the summary; or, for a dry run, print the plan and open
no study. `nas.commands.run` parses the options and calls `search`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from nas.core.staging import check_output_folder
from nas.search.run_results import refresh, score_front, summary
from nas.search.run_setup import set_up
from nas.search.run_study import announce, open_run_study
from nas.search.run_trials import run_trials
from nas.search.workers import run_workers

if TYPE_CHECKING:
    from nas.search.console import RunLog
    from nas.search.run_hooks import RunHooks


def search(args: argparse.Namespace, log: RunLog, processes: int | None, hooks: RunHooks) -> int:
    """The search as `nas run` asked for it (`processes`: its checked --processes); the exit
    code. A worker started by --workers runs trials and leaves the front to its parent."""
    is_worker = args.worker_index is not None
    setup = set_up(args, processes, hooks)
    check_output_folder(setup.study_dir)  # a dry run says so too
    if args.dry_run:
        from nas.search.dry_run import dry_run

        return dry_run(setup)
    study, storage = open_run_study(args, log, setup)
    from nas.search.schedule.policy import has_work
    from nas.search.study import n_settled

    working = has_work(study.get_trials(deepcopy=False), setup.schedule)
    if not is_worker:
        announce(setup, study, storage, n_settled(study))
    if working and args.workers > 1:
        return run_workers(args, study, setup, storage, hooks)
    if working:
        interrupted = run_trials(args, log, setup, study)
        if interrupted is not None:
            return interrupted
    if is_worker:
        return 0
    score_front(study, setup, hooks)
    front = refresh(study, setup.study_dir) or []
    summary(study, setup.study_dir, front, args)
    return 0
