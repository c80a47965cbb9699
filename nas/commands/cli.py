"""What every `python -m nas.*` command shares: user mistakes as one line and exit code 2,
Ctrl-C as one line and exit code 130, a console it can no longer write to as exit code 2
(141 for a pipe its reader closed).

A NasError, or an OSError about a path (the system's reason and the path: a name too long, a
file where a folder should be, no permission, a full disk), is the user's to fix; anything
else is a bug and keeps its traceback. A closed stdout or stderr is refused before the
command starts (a file it opened would take the closed descriptor's number); one that fails
later (a full disk, a closed pipe) stops it as Ctrl-C does, in one line on stderr where
stderr still works. Torch and Optuna are imported only when a command runs, so that `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from nas.core.errors import NasError
from nas.core.secrets import register, scrubbed_console

if TYPE_CHECKING:
    import torch


def command_module(command: str) -> str:
    """The module that runs `nas COMMAND`: nas.run for run, nas.storage_proxy for
    storage-proxy."""
    return f"nas.commands.{command.replace('-', '_')}"


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of `nas COMMAND`, its usage line spelled as the user typed it:
    `nas COMMAND`, or `python -m nas.COMMAND` when run as that module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    shim = f"nas.{command.replace('-', '_')}"  # what a user runs with python -m
    as_module = spec is not None and spec.name in (shim, command_module(command))
    prog = f"python -m {shim}" if as_module else f"nas {command}"
    return _Parser(prog=prog, description=description)


class _Parser(argparse.ArgumentParser):
    """A usage mistake as two lines (what is wrong, where the options are), exit code 2,
    rather than argparse's whole usage block."""

    def error(self, message: str):
        self.exit(
            2, f"{self.prog}: error: {one_line(message)}\nsee {self.prog} --help for the options\n"
        )


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters (a path may hold them)
    escaped, so that an error stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
        help="default: cuda, then mps, then cpu",
    )  # fmt: skip


def add_processes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processes", type=int, metavar="N",
        help="processes that preprocess the dataset when its cache is built (default: one "
        "per core up to 8, one for a small dataset; fewer where memory is short)",
    )  # fmt: skip


def processes_option(value: int | None) -> int | None:
    """The `--processes` value, or a NasError when it is not a positive count or more than
    the machine's cores allow (`pool_option`)."""
    return pool_option("--processes", value)


# A thread or process option may ask for this many per core this process may run on, at
# most: beyond it they only wait for each other, while each holds its stack or interpreter.
POOL_PER_CORE = 4


def pool_option(option: str, value: int | None, minimum: int = 1) -> int | None:
    """The value of a thread or process count `option` (--threads, --workers, --processes,
    --data-workers), or a NasError when it is below `minimum` or above POOL_PER_CORE times
    the cores this process may run on; None stays None (the command's default)."""
    from nas.core.resources import available_cores

    if value is None:
        return None
    if value < minimum:
        raise NasError(option, f"must be at least {minimum}, not {value}")
    cores = available_cores()
    if value > POOL_PER_CORE * cores:
        raise NasError(
            option,
            f"asks for {value:,}, more than this machine can run: at most {POOL_PER_CORE} "
            f"per core, {POOL_PER_CORE * cores} on its {cores} core{'s' if cores > 1 else ''}",
        )
    return value


def device_option(name: str) -> torch.device:
    """The device a `--device` option asks for, or a NasError saying it is not here."""
    from nas.network.device import pick_device

    try:
        return pick_device(name)
    except ValueError as err:
        raise NasError("--device", str(err)) from None


class ConsoleLost(KeyboardInterrupt):
    """stdout or stderr can no longer be written (a pipe its reader closed, a full disk, a
    failing device). A KeyboardInterrupt, so that the command stops as at Ctrl-C: a trial
    under way is recorded as interrupted and what finished is kept. Exit code 141 for the
    closed pipe (128 + SIGPIPE, as a shell reports a process its pipe ended), else 2."""

    def __init__(self, stream: str, error: OSError) -> None:
        reason = error.strerror or type(error).__name__
        super().__init__(f"{stream}: {reason}; the command stopped, keeping what it finished")
        self.stream = stream
        self.exit_code = 128 + signal.SIGPIPE if isinstance(error, BrokenPipeError) else 2


class _Watched:
    """A console stream whose failing write or flush raises ConsoleLost, noted in `lost`
    too, should a handler of Ctrl-C swallow it."""

    def __init__(self, stream: TextIO, name: str, lost: list[ConsoleLost]) -> None:
        self.stream, self.name, self.lost = stream, name, lost

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as err:
            raise self._lost(err) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as err:
            raise self._lost(err) from None

    def _lost(self, err: OSError) -> ConsoleLost:
        self.lost.append(ConsoleLost(self.name, err))
        return self.lost[-1]

    def __getattr__(self, name: str):  # isatty, fileno, encoding: the stream's
        return getattr(self.stream, name)


def _closed_console() -> int | None:
    """Exit code 2, said on stderr where it is open, when stdout or stderr is closed (Python
    sets it to None)."""
    if sys.stdout is not None and sys.stderr is not None:
        return None
    if sys.stderr is not None:
        print("error: stdout: is closed; give the command somewhere to write, e.g. > /dev/null",
              file=sys.stderr)  # fmt: skip
    return 2


def _console_lost(lost: ConsoleLost) -> int:
    """The exit code of a command whose console failed. The failed stream is pointed at
    /dev/null, so that the interpreter's last flush of what it still holds does not fail
    again (Python's recipe for a closed pipe); the one line goes to stderr if that works."""
    stream = sys.stdout if lost.stream == "stdout" else sys.stderr
    with contextlib.suppress(OSError, ValueError, AttributeError):  # not a file: nothing held
        descriptor = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, descriptor)
        os.close(devnull)
    if lost.stream == "stdout":
        with contextlib.suppress(OSError):
            print(f"error: {one_line(str(lost))}", file=sys.stderr, flush=True)
    return lost.exit_code


def exit_code(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """run(args), with a NasError printed as `error: SOURCE: REASON` and exit code 2. The
    password of any storage URL among the arguments is hidden in all it prints. The study
    storages it opened are closed when it ends."""
    import optuna

    from nas.search.storage import close_storages

    closed = _closed_console()
    if closed is not None:
        return closed
    for value in getattr(args, "__dict__", {}).values():  # --storage, and NAS_STORAGE as
        # nas.run's default
        if isinstance(value, str):
            register(value)
    # The commands print their own lines (a failed trial's with its reason); Optuna's log
    # would repeat them with tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    lost: list[ConsoleLost] = []
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Watched(out, "stdout", lost), _Watched(err, "stderr", lost)
    try:
        with scrubbed_console():
            code = _exit_code(run, args)
            sys.stdout.flush()  # here, not at the interpreter's exit, where it cannot be caught
            sys.stderr.flush()
    except ConsoleLost:
        pass
    finally:
        sys.stdout, sys.stderr = out, err
        close_storages()
    return _console_lost(lost[0]) if lost else code


def _exit_code(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return run(args)
    except NasError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a bug, with its traceback
            raise
        # A path the system refuses (name too long, not a folder, no permission, disk full):
        # the user's to fix, named with the system's reason.
        where = one_line(str(err.filename))
        print(f"error: {where}: {err.strerror or type(err).__name__}", file=sys.stderr)
        return 2
    except ConsoleLost:
        raise
    except KeyboardInterrupt as err:  # Ctrl-C: what finished is kept (files renamed into place)
        print("interrupted: finished work is kept; run the same command to continue",
              file=sys.stderr)  # fmt: skip
        return getattr(err, "exit_code", 130)  # nas.run's SIGTERM carries 143
