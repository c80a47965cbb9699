"""How long rewriting results/ takes as a study grows: the refresh nas.run does after every trial.

Writes 50, 200 and 1000 finished trials straight into a fresh SQLite storage (the user attrs
and learning curves the objective records, drawn at random, a tenth of them pruned and a
twentieth failed), then times one refresh of results/ (trials.csv, pareto.csv, pareto.png,
report.html, the dashboard's learning-curve figure) as nas.run does it: one read of the
storage, every view from it. Prints seconds per refresh and per trial, and each size's time
per trial as a ratio against the smallest study's, measured in the same run.

Target: under 1 s at 1000 trials on 2 CPU cores, and time per trial roughly flat (no
quadratic term).

    python benchmarks/refresh.py [--sizes 50 200 1000] [--objectives iou params]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from nas.search.objectives import directions, values_of
from nas.search.record import write_study
from nas.search.run_results import refresh

REPEATS = 3


def synthetic_trial(rng: np.random.Generator, number: int, objectives: list[str]):
    """A finished trial as the objective records one: configs, counts, a learning curve."""
    depth = int(rng.integers(2, 6))
    dims = int(rng.choice([2, 3]))
    epochs = int(rng.choice([3, 10, 30]))
    n_params = int(10 ** rng.uniform(3, 7))
    curve = np.clip(np.cumsum(rng.uniform(0, 0.08, epochs)) + rng.uniform(0, 0.2), 0, 0.95)
    quantities = {
        "iou": float(curve[-1]),
        "dice": float(2 * curve[-1] / (1 + curve[-1])),
        "params": n_params,
        "macs": n_params * float(rng.uniform(50, 5000)),
        "latency_ms": float(rng.uniform(0.5, 50)),
        "memory_mb": float(rng.uniform(5, 500)),
    }
    states = [TrialState.COMPLETE] * 17 + [TrialState.PRUNED] * 2 + [TrialState.FAIL]
    state = states[int(rng.integers(len(states)))]
    attrs = {
        "unet_config": {"spatial_dims": dims, "depth": depth, "base_channels": 8},
        "train_config": {"batches_per_epoch": 10, "batch_size_2d": 2},
        "n_params": n_params,
        "macs": quantities["macs"],
        "latency_ms": quantities["latency_ms"],
        "memory_mb": quantities["memory_mb"],
        "val_iou": quantities["iou"],
        "val_dice": quantities["dice"],
        "epochs_run": epochs,
        "steps": epochs * 10,
        "seconds": float(rng.uniform(1, 60)),
        "summary": f"{dims}D U-Net, depth {depth}",
        "train_loss": [float(v) for v in 1 - curve],
    }
    if state == TrialState.FAIL:
        attrs = {"fail_reason": "out of memory", "unet_config": attrs["unet_config"]}
    return create_trial(
        state=state,
        values=values_of(quantities, objectives) if state == TrialState.COMPLETE else None,
        params={"depth": depth, "spatial_dims": dims, "learning_rate": 1e-3},
        distributions={
            "depth": IntDistribution(2, 5),
            "spatial_dims": CategoricalDistribution([2, 3]),
            "learning_rate": FloatDistribution(1e-4, 1e-1, log=True),
        },
        user_attrs=attrs,
        intermediate_values={} if state == TrialState.FAIL
        else {e + 1: float(v) for e, v in enumerate(curve)},
    )  # fmt: skip


def time_refresh(n_trials: int, objectives: list[str], workdir: Path) -> float:
    """The fastest of REPEATS refreshes of a study of `n_trials` finished trials."""
    study_dir = workdir / f"bench{n_trials}"
    study_dir.mkdir(parents=True)
    storage = f"sqlite:///{study_dir / 'study.db'}"
    study = optuna.create_study(
        storage=storage, study_name=study_dir.name, directions=directions(objectives)
    )
    write_study(study, objectives=objectives)
    rng = np.random.default_rng(n_trials)
    study.add_trials([synthetic_trial(rng, n, objectives) for n in range(n_trials)])
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        if refresh(study, study_dir) is None:
            raise RuntimeError(f"the refresh of {n_trials} trials failed")
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--objectives", nargs="+", default=["iou", "params"])
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        seconds = {n: time_refresh(n, args.objectives, Path(tmp)) for n in args.sizes}
    base = args.sizes[0]
    print(f"objectives {args.objectives}; fastest of {REPEATS} refreshes")
    print(f"{'trials':>7} {'seconds':>8} {'ms/trial':>9} {'per-trial ratio':>16}")
    for n, s in seconds.items():
        ratio = (s / n) / (seconds[base] / base)
        print(f"{n:>7} {s:>8.3f} {1000 * s / n:>9.2f} {ratio:>16.2f}")
    largest = args.sizes[-1]
    verdict = "HOLDS" if seconds[largest] < 1.0 else "FAILS"
    print(f"target: under 1 s at {largest} trials: {verdict} ({seconds[largest]:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
