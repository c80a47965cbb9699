"""`--workers N`: a search run as N worker processes on this machine sharing one study, each
started as `nas.run` with its share of the threads (and one GPU each, where there are GPUs),
given the storage through the environment, and passed on the one Ctrl-C or SIGTERM the
parent receives."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import TYPE_CHECKING

from nas.search.interrupts import Interrupted
from nas.search.run_results import refresh, score_front, summary

if TYPE_CHECKING:
    import optuna

    from nas.search.run_hooks import RunHooks
    from nas.search.run_setup import RunSetup

# The storage URL for workers started by --workers, and a way for users to keep a database
# password off the command line (where `ps` shows it to everyone on the machine).
STORAGE_ENV = "NAS_STORAGE"


def worker_command(
    args: argparse.Namespace, index: int, threads: int, data_workers: int
) -> list[str]:
    command = [sys.executable, "-m", "nas.run", str(args.space), "--workers", "1",
               "--threads", str(threads), "--data-workers", str(data_workers),
               "--worker-index", str(index),
               "--results-dir", str(args.results_dir), "--device", args.device]  # fmt: skip
    for option in ("n_trials", "timeout", "budget", "study_name", "seed"):
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    for setting in args.settings:  # the workers search the same effective space
        command += ["--set", setting]
    if args.data is not None:
        command += ["--data", str(args.data)]
    if args.quiet:
        command.append("-q")
    return command  # the storage goes through the environment: no password in `ps`


def run_workers(
    args: argparse.Namespace, study: optuna.Study, setup: RunSetup, storage: str, hooks: RunHooks
) -> int:
    """Start `--workers` processes on the study and wait for them; results/ at the end.

    Each worker has its own process group, so a Ctrl-C at the terminal reaches this process
    only, and each worker gets exactly one signal, passed on from here."""
    import torch

    from nas.training.batches import default_workers

    gpus = torch.cuda.device_count()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    data_workers = args.data_workers
    if data_workers is None:  # the machine's cores shared among the workers
        data_workers = default_workers(torch.device("cuda" if gpus else "cpu"), args.workers)
    workers = []
    for index in range(args.workers):
        env = dict(os.environ)
        env[STORAGE_ENV] = storage
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        command = worker_command(args, index, threads, data_workers)
        workers.append(subprocess.Popen(command, env=env, start_new_session=True))
    where = f"GPU {', '.join(str(i % gpus) for i in range(args.workers))}" if gpus else "CPU"
    print(f"{args.workers} workers on {where}, {threads} torch thread(s) each", flush=True)
    interrupted = 0
    try:
        codes = [worker.wait() for worker in workers]
    except Interrupted as err:
        interrupted = err.exit_code
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(interrupted - 128)
        codes = [worker.wait() for worker in workers]
    if not interrupted:
        score_front(study, setup, hooks)
    study_dir = setup.study_dir
    front = refresh(study, study_dir) or []
    lost = [f"worker {i} exited with {code}" for i, code in enumerate(codes) if code]
    if interrupted:
        print("interrupted: finished trials are kept; run the same command to continue")
        return interrupted
    summary(study, study_dir, front, args)
    if lost:
        print("; ".join(lost) + ": its trial is retried by a live worker or on the next run")
        return 1
    return 0
