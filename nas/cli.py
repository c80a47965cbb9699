"""What every `python -m nas.*` command shares: user mistakes as one line and exit code 2,
Ctrl-C as one line and exit code 130.

A NasError, or an OSError about a path (the system's reason and the path: a name too long, a
file where a folder should be, no permission, a full disk), is the user's to fix; anything
else is a bug and keeps its traceback. Torch and Optuna are
imported only when a command runs, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from nas.errors import NasError
from nas.secrets import register, scrubbed_console

if TYPE_CHECKING:
    import torch


def command_module(command: str) -> str:
    """The module that runs `nas COMMAND`: nas.run for run, nas.storage_proxy for
    storage-proxy."""
    return f"nas.{command.replace('-', '_')}"


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of `nas COMMAND`, its usage line spelled as the user typed it:
    `nas COMMAND`, or `python -m nas.COMMAND` when run as that module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    module = command_module(command)
    as_module = spec is not None and spec.name == module
    prog = f"python -m {module}" if as_module else f"nas {command}"
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
    """The `--processes` value, or a NasError when it is not a positive count."""
    if value is not None and value < 1:
        raise NasError("--processes", f"must be at least 1, not {value}")
    return value


def device_option(name: str) -> torch.device:
    """The device a `--device` option asks for, or a NasError saying it is not here."""
    from nas.train import pick_device

    try:
        return pick_device(name)
    except ValueError as err:
        raise NasError("--device", str(err)) from None


def exit_code(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """run(args), with a NasError printed as `error: SOURCE: REASON` and exit code 2. The
    password of any storage URL among the arguments is hidden in all it prints. The study
    storages it opened are closed when it ends."""
    import optuna

    from nas.storage import close_storages

    for value in getattr(args, "__dict__", {}).values():  # --storage, and NAS_STORAGE as
        # nas.run's default
        if isinstance(value, str):
            register(value)
    # The commands print their own lines (a failed trial's with its reason); Optuna's log
    # would repeat them with tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with scrubbed_console():
            return _exit_code(run, args)
    finally:
        close_storages()


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
    except KeyboardInterrupt as err:  # Ctrl-C: what finished is kept (files renamed into place)
        print("interrupted: finished work is kept; run the same command to continue",
              file=sys.stderr)  # fmt: skip
        return getattr(err, "exit_code", 130)  # nas.run's SIGTERM carries 143
