"""How long `--help` takes: every command, as `python -m nas.COMMAND --help` and as
`nas COMMAND --help`, against a Python that does nothing (`python -c pass`); then how long a
command takes to answer a mistake (a malformed space, a bad --set, a missing dataset, model
or results folder), against `python -c "import torch"`, the cost such an answer avoids.

Each is a fresh process, timed best of --repeats; `nas COMMAND` is run as `python -m nas
COMMAND`, which is what the `nas` script calls. A command that imported torch, optuna or
monai before parsing its arguments would take seconds here. Prints seconds and the ratio to
`python -c pass`.

Target: every --help under 1 s on 2 CPU cores. The mistakes have no target: their figures
show whether the answer comes before torch loads.

    python benchmarks/cli_help.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from nas.__main__ import COMMANDS

TARGET_S = 1.0


SPACE = Path(__file__).parents[1] / "search_spaces" / "unet.yaml"


def best_seconds(
    command: Sequence[str], repeats: int, exit_code: int = 0, cwd: Path | None = None
) -> float:
    """The fastest of `repeats` runs of `command` in a fresh process, in seconds; each must
    end with `exit_code`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != exit_code:
            raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr}")
    return min(times)


def mistakes(python: str, folder: Path) -> list[tuple[str, list[str]]]:
    """Commands that a user got wrong, each answered with exit code 2, run in `folder`."""
    (folder / "bad.yaml").write_text("search: [\n")
    nas = [python, "-m", "nas"]
    return [
        ("nas run bad.yaml", [*nas, "run", "bad.yaml"]),
        ("nas run unet.yaml --set train.epochs=0",
         [*nas, "run", str(SPACE), "--set", "train.epochs=0"]),
        ("nas run unet.yaml --data missing", [*nas, "run", str(SPACE), "--data", "missing"]),
        ("nas export missing", [*nas, "export", "missing"]),
        ("nas predict missing in out", [*nas, "predict", "missing", "in", "out"]),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    python = sys.executable
    baseline = best_seconds([python, "-c", "pass"], args.repeats)
    print(f"{'command':<36} {'seconds':>8} {'ratio':>7}")
    print(f"{'python -c pass':<36} {baseline:8.3f} {1:7.1f}")
    rows = [("nas --help", [python, "-m", "nas", "--help"])]
    for command in COMMANDS:
        rows.append((f"python -m nas.{command} --help", [python, "-m", f"nas.{command}", "--help"]))
        rows.append((f"nas {command} --help", [python, "-m", "nas", command, "--help"]))
    slowest = 0.0
    for label, command in rows:
        seconds = best_seconds(command, args.repeats)
        slowest = max(slowest, seconds)
        print(f"{label:<36} {seconds:8.3f} {seconds / baseline:7.1f}")
    verdict = "met" if slowest < TARGET_S else "missed"
    print(f"slowest {slowest:.3f} s: target < {TARGET_S:g} s {verdict}")

    print()
    torch_seconds = best_seconds([python, "-c", "import torch"], args.repeats)
    label = 'python -c "import torch"'
    print(f"{label:<44} {torch_seconds:8.3f} {torch_seconds / baseline:7.1f}")
    with tempfile.TemporaryDirectory() as folder:
        for label, command in mistakes(python, Path(folder)):
            seconds = best_seconds(command, args.repeats, exit_code=2, cwd=Path(folder))
            print(f"{label:<44} {seconds:8.3f} {seconds / baseline:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
