"""Scaling: finished trials per hour with 1 and 2 workers, and the storage's cost per trial.

1. The default space (pruner on), the real command, the same wall-clock budget: one worker
   with one torch thread, then `--workers 2` with one thread each, on a fresh SQLite study
   each time. Prints finished (complete or pruned) trials per hour and the ratio.
2. The storage calls one trial makes (ask, ~12 user attrs, 8 intermediate values, the
   pruner's read of all trials each epoch, tell), replayed 100 times against SQLite, a
   journal file, SQLite behind Optuna's gRPC proxy (`nas storage-proxy`, when grpcio is
   installed) and, with --postgres URL, PostgreSQL. Prints milliseconds per trial and
   their share of the median trial's seconds from part 1.
3. The trial files of one trial through a shared artifact folder (nas/search/trial_files.py): the
   weights and training state of the default space's first candidate published by one
   "host" and fetched and checked by another, 20 times; milliseconds per trial and share.

    python benchmarks/scaling.py [--budget 300] [--postgres postgresql+psycopg://...]

Targets: 2 workers >= 1.7x one worker's trials per hour; storage overhead < 2% of a trial;
the trial files' < 2% of a trial.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from nas.search.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def trials_per_hour(workdir: Path, space: dict, workers: int, budget: float) -> tuple[float, list]:
    name = f"scaling-{workers}"
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    command = [sys.executable, "-m", "nas.run", str(path), "--study-name", name,
               "--workers", str(workers), "--threads", "1", "--timeout", str(budget),
               "--n-trials", "100000", "--results-dir", "runs"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=workdir, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/runs/{name}/study.db")
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished]
    return len(finished) * 3600 / elapsed, seconds


def storage_ms_per_trial(url: str, n: int = 100) -> float:
    storage = open_storage(url)
    study = optuna.create_study(
        storage=storage,
        study_name=f"overhead-{time.time_ns()}",
        directions=["maximize", "minimize"],
    )
    start = time.perf_counter()
    for _ in range(n):
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)
        for key in range(12):
            trial.set_user_attr(f"attr_{key}", [1.0] * 8)
        for epoch in range(1, 9):
            trial.storage.set_trial_intermediate_value(trial._trial_id, epoch, 0.5)
            study.get_trials(deepcopy=False)
        study.tell(trial, [0.5, 1000])
    return (time.perf_counter() - start) * 1000 / n


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def storage_proxy(url: str) -> Iterator[str | None]:
    """`nas storage-proxy` over `url` on a free port: its grpc:// URL (None without grpcio)."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        yield None
        return
    port = _free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "nas.storage_proxy", "--storage", url,
                              "--port", str(port)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        proxy.stdout.readline()  # its startup line: serving
        yield f"grpc://127.0.0.1:{port}"
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


def trial_files_ms_per_trial(workdir: Path, n: int = 20) -> tuple[float, int]:
    """One trial's weights and state published by one host and fetched by another."""
    import torch

    from nas.network.builder import build_unet
    from nas.network.unet_config import UNetConfig
    from nas.search.record import write_study
    from nas.search.trial_files import store_url, trial_files

    model = build_unet(UNetConfig(spatial_dims=2, depth=4, base_channels=16))  # the default
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 1, 64, 64)).sum().backward()
    optimizer.step()  # its state: the moments a promotion continues from
    (workdir / "store").mkdir()
    study = optuna.create_study(storage=f"sqlite:///{workdir / 'files.db'}", study_name="f")
    write_study(study, artifacts=store_url(str(workdir / "store")))
    a, b = trial_files(study, workdir / "a"), trial_files(study, workdir / "b")
    size = 0
    start = time.perf_counter()
    for number in range(n):
        weights = a.study_dir / f"checkpoints/trial_{number:04d}.pt"
        state = weights.with_name(weights.stem + ".state.pt")
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
        torch.save({"epoch": 3, "optimizer": optimizer.state_dict()}, state)
        size = weights.stat().st_size + state.stat().st_size
        for path in (weights, state):
            a.publish(path)
            b.local(b.study_dir / path.relative_to(a.study_dir))
    return (time.perf_counter() - start) * 1000 / n, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per arm")
    parser.add_argument("--postgres", help="a PostgreSQL URL to measure too")
    args = parser.parse_args()
    space = yaml.safe_load((ROOT / "search_spaces" / "unet.yaml").read_text())
    space["study"]["enqueue"] = []  # the same random start for both arms
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ["NAS_CACHE_DIR"] = str(workdir / "cache")
        warm = {**space, "study": {**space["study"], "n_trials": 1}}
        warm["train"] = {**space["train"], "epochs": 1, "batches_per_epoch": 1}
        (workdir / "warm.yaml").write_text(yaml.safe_dump(warm, sort_keys=False))
        subprocess.run([sys.executable, "-m", "nas.run", "warm.yaml", "--results-dir", "warm"],
                       cwd=workdir, check=True, capture_output=True)  # fmt: skip
        one, seconds = trials_per_hour(workdir, space, 1, args.budget)
        two, more = trials_per_hour(workdir, space, 2, args.budget)
        print(f"budget {args.budget:.0f} s per arm, 1 torch thread per worker")
        print(f"1 worker : {one:7.1f} finished trials per hour")
        print(f"2 workers: {two:7.1f} finished trials per hour, ratio {two / one:.2f} "
              "(target >= 1.7)")  # fmt: skip
        median_trial = statistics.median(seconds + more)
        urls = {
            "SQLite": f"sqlite:///{workdir / 'overhead.db'}",
            "journal file": f"journal:///{workdir / 'overhead.log'}",
        }
        if args.postgres:
            urls["PostgreSQL"] = args.postgres
        print(f"storage calls of one trial (median trial {median_trial:.1f} s):")
        with storage_proxy(f"sqlite:///{workdir / 'proxied.db'}") as proxied:
            if proxied is not None:
                urls["gRPC proxy"] = proxied
            for name, url in urls.items():
                ms = storage_ms_per_trial(url)
                print(f"  {name:<13}{ms:8.1f} ms per trial, {ms / 10 / median_trial:6.3f}% "
                      "(target < 2%)")  # fmt: skip
        ms, size = trial_files_ms_per_trial(workdir)
        print(f"trial files through a shared folder ({size / 1e6:.1f} MB of weights and state "
              f"published and fetched): {ms:.1f} ms per trial, {ms / 10 / median_trial:.3f}% "
              "(target < 2%)")  # fmt: skip


if __name__ == "__main__":
    main()
