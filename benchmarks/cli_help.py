"""How long `--help` takes: every command, as `python -m nas.COMMAND --help` and as
`nas COMMAND --help`, against a Python that does nothing (`python -c pass`).

Each is a fresh process, timed best of --repeats; `nas COMMAND` is run as `python -m nas
COMMAND`, which is what the `nas` script calls. A command that imported torch, optuna or
monai before parsing its arguments would take seconds here. Prints seconds and the ratio to
`python -c pass`.

Target: every --help under 1 s on 2 CPU cores.

    python benchmarks/cli_help.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

from nas.__main__ import COMMANDS

TARGET_S = 1.0


def best_seconds(command: Sequence[str], repeats: int) -> float:
    """The fastest of `repeats` runs of `command` in a fresh process, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
