"""Where a search's wall time goes: the share spent in training steps, and the front it found.

    python benchmarks/training_share.py [--workdir DIR] -- SPACE [nas.run options...]

Runs `python -m nas.run SPACE [options]` in DIR (default: a new temporary folder; relative
paths in the options are taken from the current folder) as a user would, times it, then
reads its study and prints:

- the run's wall time, and the seconds in training steps (each trial's own epochs'
  `epoch_seconds`, data sampling included; a continuation's inherited epochs not counted
  twice), as a share of it: the rest is validation, building, measuring, storage and the
  front's final scoring;
- trials, candidates, and the front: params, steps, the search score with its standard
  error over validation cases, the whole-volume validation IoU, and whether a member is
  marked undertrained or below the top rung; the decades of parameters it spans;
- the seconds of the front's final whole-volume and held-out scoring, as the run printed
  them.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from nas.search.record import StudyRecord, TrialRecord
from nas.search.results import front_table
from nas.search.scoring import front_intervals, front_of, superseded_numbers


def training_seconds(trials: list) -> float:
    """Seconds in training steps over every trial's own epochs."""
    by_number = {t.number: t for t in trials}
    total = 0.0
    for trial in trials:
        record = TrialRecord.of(trial)
        inherited = 0
        if record.continues is not None and record.continues in by_number:
            inherited = len(TrialRecord.of(by_number[record.continues]).epoch_seconds)
        total += sum(record.epoch_seconds[inherited:])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("run", nargs=argparse.REMAINDER, help="-- SPACE [nas.run options]")
    args = parser.parse_args(argv)
    run_args = [a for a in args.run if a != "--"]
    if not run_args:
        parser.error("give the search space after --")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="training_share_"))
    workdir.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    absolute = [str((cwd / a).resolve()) if (cwd / a).exists() else a for a in run_args]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "nas.run", *absolute, "-q"], cwd=workdir,
                            capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    print(result.stdout[-3000:])
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return result.returncode
    (db,) = sorted((workdir / "results").glob("*/study.db"))
    storage = f"sqlite:///{db}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    training = training_seconds(trials)
    candidates = {TrialRecord.of(t).candidate for t in trials if TrialRecord.of(t).steps}
    front = front_of(trials, ["iou", "params"])
    intervals = front_intervals(study, front)
    table = front_table(front, None, intervals, StudyRecord.of(study).volume_scores)
    columns = ["number", "n_params", "fidelity_steps", "val_iou", "val_iou_se",
               "volume_val_iou", "undertrained", "below_top_rung"]  # fmt: skip
    params = [t for t in table["n_params"] if t]
    decades = math.log10(max(params) / min(params)) if params else 0.0
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    print(f"workdir {workdir}")
    print(f"wall {wall:.1f} s; training steps {training:.1f} s; training share "
          f"{training / wall:.2f}")  # fmt: skip
    print(
        f"trials {len(trials)} ({len(completed)} completed, "
        f"{len(superseded_numbers(trials))} continued), candidates {len(candidates)}"
    )
    print(f"front of {len(front)} over {decades:.2f} decades of parameters; best score "
          f"{table['val_iou'].max():.3f}")  # fmt: skip
    print(table[columns].to_string(index=False, float_format="{:.3f}".format))
    for line in result.stdout.splitlines():
        if re.match(r"scored \d+ front member", line):
            print(line)
    for row in StudyRecord.of(study).rung_correlations:
        print(f"rung {row['lower']} -> {row['upper']}: Spearman {row['spearman']} over "
              f"{row['candidates']} candidates")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
