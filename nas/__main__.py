"""`nas COMMAND ...` (or `python -m nas COMMAND ...`): one entry point for every command.

Each command hands the rest of the command line to that module's `main`, so its options,
errors and exit codes are exactly those of `python -m nas.COMMAND`. Nothing heavy is
imported before a command is chosen, so `nas --help` and `nas COMMAND --help` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from nas.commands.cli import command_module

# Command -> what it does, in one line of `nas --help`; each is the module nas.<command>
# (a hyphen in the command is an underscore in the module's name).
COMMANDS = {
    "run": "start or resume a search of a space (SPACE.yaml)",
    "export": "write one architecture of the front as a model folder",
    "predict": "segment NIfTI scans with an exported model",
    "ensemble": "average the probabilities of several models' predictions into masks",
    "evaluate": "score predicted masks against reference labels",
    "retrain": "retrain front members at the full budget, or cross-validate them",
    "report": "rewrite results/<study>/report.html",
    "dashboard": "serve optuna-dashboard on a study and its artifacts",
    "storage-proxy": "serve a study storage to workers on many hosts (grpc://HOST:PORT)",
}


def package_version() -> str:
    try:
        return version("nas")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    commands = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="nas",
        description="Neural architecture search for 2D/3D U-Net segmentation of NIfTI images.",
        epilog=f"commands:\n{commands}\n\n`nas COMMAND --help` shows a command's options;\n"
        "`nas COMMAND ...` is the same as `python -m nas.COMMAND ...`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nas {package_version()}")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # The first word that is not an option is the command; everything after it is the
    # command's own, --help included.
    split = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    args = parser.parse_args(argv[: split + 1])
    module = importlib.import_module(command_module(args.command))
    return module.main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
