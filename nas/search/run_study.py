"""The study a search run works on: opened or created in its storage (a worker finds the one
its parent opened), checked against this run's space, data and artifact store, with the
trials a crashed run left settled; and the line that says what the run will do."""

from __future__ import annotations

import argparse
import os
import socket
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.staging import atomic_write, remove_stale_staging
from nas.search.run_setup import RunSetup, plan_line

if TYPE_CHECKING:
    import optuna

    from nas.search.console import RunLog

SPACE_FILE = "space.yaml"  # the effective search space, beside the study
RUN_LOG = "run.log"  # what the run printed, and the warnings raised


def open_run_study(
    args: argparse.Namespace, log: RunLog, setup: RunSetup
) -> tuple[optuna.Study, str]:
    """The run's study, created or resumed (a worker finds the one its parent opened); the
    first process also checks the study accepts this space and data, and settles the trials
    a crashed run left."""
    import yaml

    from nas.network.model_card import describe_data
    from nas.search import resume
    from nas.search.liveness import settle_orphans
    from nas.search.record import write_study
    from nas.search.study import default_storage, open_study
    from nas.search.weights import checkpoint_path

    space, study_dir = setup.space, setup.study_dir
    is_worker = args.worker_index is not None
    storage = args.storage or default_storage(study_dir)
    # Workers started by --workers find the study their parent opened (and re-enqueued).
    # First: a storage that cannot be opened (no server, no proxy) leaves no folder behind.
    salt = _worker_salt(args, storage)
    study = open_study(space.study, storage, setup.warm_start, not is_worker, salt)
    study_dir.mkdir(parents=True, exist_ok=True)
    for folder in (study_dir, checkpoint_path(study_dir, 0).parent):
        remove_stale_staging(folder)  # what a killed process was writing
    if not is_worker:
        log.attach(study_dir / RUN_LOG)
    if is_worker:
        return study, storage
    _check_artifact_store(study, study_dir, storage, setup.artifacts)
    data = {
        "data_config": space.data.to_dict(),
        "data_description": describe_data(setup.dataset),
        "patch_plan": setup.patch_plan.to_dict(),
        "data_cases": {
            "train": [case.name for case in setup.train_cases],
            "validation": [case.name for case in setup.val_cases],
        },
    }
    resume.check(study, space, data, args.space, args.extend_space)
    write_study(study, validation=resume.validation_record(space))  # for resumes, intervals
    # What this run searches, --set and --data included; once the study accepted it.
    text = yaml.safe_dump(setup.effective, sort_keys=False)
    atomic_write(study_dir / SPACE_FILE, lambda tmp: tmp.write_text(text))
    orphans = settle_orphans(study, space.study.heartbeat)  # a crashed run's trials
    if orphans.failed:
        numbers = ", ".join(str(n) for n in orphans.failed)
        print(f"trial(s) {numbers} lost their worker: marked FAIL and run again", flush=True)
    return study, storage


def _check_artifact_store(
    study: optuna.Study, study_dir: Path, storage: str, given: str | None
) -> None:
    """The study records the store it was given (once); a store other than the one it
    records is refused, and the one it records must still be there."""
    from nas.search.record import StudyRecord, write_study
    from nas.search.storage import local_file
    from nas.search.trial_files import open_store

    recorded = StudyRecord.of(study).artifacts
    name = study.study_name
    if given is not None and recorded is not None and given != recorded:
        raise NasError("--artifacts", f"study {name!r} keeps its trial files in {recorded}; "
                       "give that store, or none (the study's is used)")  # fmt: skip
    if recorded is None and given is not None:
        write_study(study, artifacts=given)
    elif recorded is not None and given is None:
        open_store(recorded, f"study {name!r}")  # still there?
    elif recorded is None and (local_file(storage) is None or storage.startswith("journal:")):
        print(f"note: the trial files stay in {study_dir} on this host, so other hosts "
              "cannot continue, export or retrain what it trains: give the study a store "
              "they all reach (--artifacts FOLDER or s3://BUCKET/PREFIX)", flush=True)  # fmt: skip


def _worker_salt(args: argparse.Namespace, storage: str) -> int:
    """0 for the usual single process (reproducible draws); the worker's index + 1 for
    --workers; for a shared server, storage proxy or journal, where other hosts may start at
    the same moment with the same seed, a number from this host and process."""
    if args.worker_index is not None:
        return args.worker_index + 1
    if storage.startswith("sqlite:"):
        return 0
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())


def announce(setup: RunSetup, study: optuna.Study, storage: str, already: int) -> None:
    from nas.search.storage import redact

    study_cfg = setup.space.study
    remaining = study_cfg.n_trials - already
    print(
        f"study {study_cfg.name!r} in {redact(storage)}: {already} finished trials, "
        f"{max(remaining, 0)} to run on {setup.device} "
        f"({len(setup.train_cases)} training / {len(setup.val_cases)} validation cases, "
        f"preprocessed in {setup.dataset.cache})",
        flush=True,
    )
    print(setup.patch_plan.describe(), flush=True)
    print(plan_line(setup.schedule, setup.space), flush=True)
