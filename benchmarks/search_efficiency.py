"""Search efficiency: hypervolume of the front over time for the ways nas has searched.

Arms, on the default space and data, each under the same wall-clock budget on this machine
and the same seeds:
  (a) the default: TPE (multivariate, grouped) with multi-fidelity (MO-ASHA rungs);
  (b) the previous scheme: NSGA-II with the Pareto pruner, every candidate one fidelity
      (8 epochs of 25 steps, capped at 35 s);
  (c) NSGA-II with multi-fidelity: the sampler alone changed from (a);
  (d) random search with multi-fidelity.
Each run is the real command (`python -m nas.run`) on a copy of search_spaces/unet.yaml with
the arm's settings, one run after another, so no two share the CPU. Hypervolume: IoU in
[0, 1] (maximised) against log10(params) normalised to [0, 1] between the smallest and
largest networks of the space (from 300 sampled candidates), reference point (IoU 0, size 1),
over the trials completed by then (a promoted candidate counts at each fidelity it reached).
The median over seeds is printed at tenths of the budget, and for each arm the budget
fraction at which its median curve first reaches (b)'s final median hypervolume.

    python benchmarks/search_efficiency.py [--budget 240] [--seeds 0 1 2] [--arms a b c d]
        [--workdir DIR]

--workdir keeps every run's study (otherwise a temporary folder is used and removed).

Target: (a) reaches (b)'s final hypervolume within 50% of the budget and ends higher than
(b), (c) and (d).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from nas import build_unet, count_parameters
from nas.search.draw import sample
from nas.search.record import TrialRecord
from nas.search.report_figures import hypervolume, normalised_size
from nas.search.space_file import load_space

ROOT = Path(__file__).resolve().parents[1]
# arm: (label, study settings, train settings) over the default space's
ASHA = {"fidelity": {"type": "asha", "min_epochs": 3, "eta": 3}, "pruner": {"type": "none"}}
FRACTIONS = [i / 10 for i in range(1, 11)]
OLD_TRAIN = {"epochs": 8, "batches_per_epoch": 25, "max_seconds": 35}
ARMS = {
    "a": ("a: tpe + multi-fidelity", {"sampler": "tpe", **ASHA}, {}),
    "b": ("b: nsga2 + pruner, 1 fidelity", {"sampler": "nsga2", "population_size": 8,
          "fidelity": {"type": "none"}, "pruner": {"type": "pareto", "warmup_epochs": 1,
          "k": 2, "min_trials": 2}}, OLD_TRAIN),
    "c": ("c: nsga2 + multi-fidelity", {"sampler": "nsga2", "population_size": 8, **ASHA}, {}),
    "d": ("d: random + multi-fidelity", {"sampler": "random", **ASHA}, {}),
}  # fmt: skip


def size_bounds(space_path: Path, n: int = 300) -> tuple[float, float]:
    """log10 of the fewest and most parameters among `n` candidates of the space."""
    space = load_space(space_path)
    # Patch and batch sizes do not change a network's size: TrainConfig's defaults for `auto`.
    space = space.model_copy(
        update={"train": {k: v for k, v in space.train.items() if v != "auto"}}
    )
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    counts = []
    for _ in range(n):
        trial = study.ask()
        candidate = sample(space, trial, in_channels=1, out_channels=1, seed=0)
        counts.append(count_parameters(build_unet(candidate.unet)))
        study.tell(trial, state=TrialState.FAIL)
    return math.log10(min(counts)), math.log10(max(counts))


def curve(study: optuna.Study, budget: float, bounds: tuple[float, float]) -> list[float]:
    """Hypervolume of the trials completed by each fraction of the budget."""
    start = min(t.datetime_start for t in study.trials)
    done = [
        (
            (t.datetime_complete - start).total_seconds(),
            r.iou,
            normalised_size(r.n_params, bounds),
        )
        for t in study.get_trials(states=(TrialState.COMPLETE,))
        for r in [TrialRecord.of(t)]
    ]
    return [
        hypervolume([(iou, size) for seconds, iou, size in done if seconds <= f * budget])
        for f in FRACTIONS
    ]


def run_arm(workdir: Path, space: dict, arm: str, seed: int, budget: float) -> optuna.Study:
    _, study, train = ARMS[arm]
    space = {**space, "study": {**space["study"], **study}, "train": {**space["train"], **train}}
    name = f"{arm}-{seed}"
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    command = [
        sys.executable, "-m", "nas.run", str(path), "--study-name", name, "--seed", str(seed),
        "--timeout", str(budget), "--n-trials", "100000", "--results-dir", "runs",
    ]  # fmt: skip
    subprocess.run(command, cwd=workdir, check=True, capture_output=True, text=True)
    db = workdir / "runs" / name / "study.db"
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=sorted(ARMS))
    parser.add_argument("--workdir", type=Path, help="keep the runs here")
    args = parser.parse_args()
    space_path = ROOT / "search_spaces" / "unet.yaml"
    space = yaml.safe_load(space_path.read_text())
    bounds = size_bounds(space_path)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir.resolve() if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        os.environ["NAS_CACHE_DIR"] = str(workdir / "cache")
        # Generate and preprocess the data once, outside every arm's budget.
        warm = {**space, "study": {**space["study"], "n_trials": 1, "enqueue": []}}
        warm["train"] = {**space["train"], "epochs": 1, "batches_per_epoch": 1}
        warm["study"]["fidelity"] = {"type": "none"}
        (workdir / "warm.yaml").write_text(yaml.safe_dump(warm, sort_keys=False))
        subprocess.run(
            [sys.executable, "-m", "nas.run", "warm.yaml", "--results-dir", "warm"],
            cwd=workdir, check=True, capture_output=True,
        )  # fmt: skip
        curves: dict[str, list[list[float]]] = {ARMS[arm][0]: [] for arm in args.arms}
        for seed in args.seeds:
            for arm in args.arms:
                label = ARMS[arm][0]
                study = run_arm(workdir, space, arm, seed, args.budget)
                curves[label].append(curve(study, args.budget, bounds))
                states = Counter(t.state.name for t in study.trials)
                print(
                    f"seed {seed} {label}: final hypervolume {curves[label][-1][-1]:.4f}; "
                    f"{states['COMPLETE']} complete, {states['PRUNED']} pruned, "
                    f"{states['FAIL']} failed, "
                    f"{sum('continues' in t.user_attrs for t in study.trials)} continued",
                    flush=True,
                )
    medians = {arm: [statistics.median(c[i] for c in runs) for i in range(len(FRACTIONS))]
               for arm, runs in curves.items()}  # fmt: skip
    target = medians.get(ARMS["b"][0], [math.nan])[-1]
    print(
        f"\nbudget {args.budget:.0f} s per run, seeds {args.seeds}; size bounds log10 params "
        f"[{bounds[0]:.2f}, {bounds[1]:.2f}]; reference point (IoU 0, size 1)"
    )
    print("median hypervolume at budget fraction:")
    print(f"{'arm':<28}" + "".join(f"{f:>7.1f}" for f in FRACTIONS) + "  reaches (b) final at")
    for arm, values in medians.items():
        reached = next((f for f, v in zip(FRACTIONS, values, strict=True) if v >= target), None)
        reached_text = f"{reached:.1f}" if reached is not None else "never"
        print(f"{arm:<28}" + "".join(f"{v:>7.3f}" for v in values) + f"  {reached_text:>10}")
    print("target: (a) reaches (b)'s final hypervolume by 0.5 and ends above (b), (c), (d)")


if __name__ == "__main__":
    main()
