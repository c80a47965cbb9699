"""What a run shows: a progress bar towards the limit that will end it, and run.log.

The bar counts towards every limit the run has (finished trials, seconds, optimiser steps)
and stands at the one nearest its end, so its time left is that of the run, not of a
`n_trials` it will never reach. `run_log` copies everything the run prints, and the warnings
Optuna and Python raise meanwhile, into `results/<study>/run.log`, storage passwords hidden
(nas/core/secrets.py), the command line's included.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from nas.core.secrets import scrub


class RunProgress:
    """A bar in percent of the nearest limit, with every limit's count beside it."""

    def __init__(
        self,
        n_trials: int,
        timeout: float | None,
        budget_steps: int | None,
        start: float,
        disable: bool,
        stream: TextIO | None = None,
    ) -> None:
        """start: when the run's clock started (time.monotonic())."""
        self.n_trials, self.timeout, self.budget_steps = n_trials, timeout, budget_steps
        self.start = start
        self.bar = tqdm(
            total=100,
            disable=disable,
            dynamic_ncols=True,
            file=stream or sys.stderr,
            bar_format="{percentage:3.0f}%|{bar}| {desc} [{elapsed}<{remaining}]",
        )

    def limits(self, settled: int, steps: int) -> list[tuple[float, str]]:
        """(share done, what it counts) for each limit the run has."""
        shares = [(settled / self.n_trials, f"{settled}/{self.n_trials} trials")]
        if self.timeout is not None:
            elapsed = time.monotonic() - self.start
            shares.append((elapsed / self.timeout, f"{elapsed:.0f}/{self.timeout:g} s"))
        if self.budget_steps is not None:
            shares.append((steps / self.budget_steps, f"{steps:,}/{self.budget_steps:,} steps"))
        return shares

    def update(self, settled: int, steps: int) -> None:
        shares = self.limits(settled, steps)
        nearest = max(share for share, _ in shares)
        self.bar.n = round(100 * min(nearest, 1.0), 1)
        self.bar.set_description_str(" · ".join(text for _, text in shares), refresh=False)
        self.bar.refresh()

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


class _Tee:
    """A text stream that also writes to the log: held in memory until the log has a file."""

    def __init__(self, stream: TextIO, log: RunLog) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding: the console's
        return getattr(self.stream, name)


class RunLog(logging.Handler):
    """The run's log: what it prints and the warnings raised, kept in memory until `attach`
    names its file (the study's folder exists only once the inputs are checked: a run
    refused for bad input writes no log)."""

    def __init__(self, console_err: TextIO, command: str) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s\n"))
        self.console_err = console_err  # for a progress bar that should not fill the log
        self.pending: list[str] = [f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n"]
        self.file: TextIO | None = None

    def attach(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by run_log)
        self.file.write(scrub("".join(self.pending)))
        self.pending.clear()

    def write(self, text: str) -> None:
        if self.file is None:
            self.pending.append(text)
        else:
            self.file.write(scrub(text))

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record))


@contextlib.contextmanager
def run_log(command: str) -> Iterator[RunLog]:
    """Copy stdout, stderr and warnings (Optuna's logger, Python's warnings) into the log
    the caller attaches to a file (appended to what earlier runs of the study wrote)."""
    console_out, console_err = sys.stdout, sys.stderr
    log = RunLog(console_err, command)
    # Optuna's warnings reach the log; its console handler keeps the verbosity it had.
    optuna_log = logging.getLogger("optuna")
    level = optuna_log.level
    consoles = [(handler, handler.level) for handler in optuna_log.handlers]
    for console, own in consoles:
        console.setLevel(max(own, level))
    optuna_log.setLevel(min(level or logging.WARNING, logging.WARNING))
    # Python's warnings: on the console as before, and in the log.
    warnings_log = logging.getLogger("py.warnings")
    shown = logging.StreamHandler(console_err)
    shown.setLevel(logging.WARNING)
    optuna_log.addHandler(log)
    warnings_log.addHandler(log)
    warnings_log.addHandler(shown)
    logging.captureWarnings(True)
    sys.stdout, sys.stderr = _Tee(console_out, log), _Tee(console_err, log)
    try:
        yield log
    finally:
        sys.stdout, sys.stderr = console_out, console_err
        logging.captureWarnings(False)
        optuna_log.removeHandler(log)
        optuna_log.setLevel(level)
        for console, own in consoles:
            console.setLevel(own)
        warnings_log.removeHandler(log)
        warnings_log.removeHandler(shown)
        if log.file is not None:
            log.file.close()
