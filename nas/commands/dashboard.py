"""`python -m nas.dashboard results/<study>`: optuna-dashboard on the study, with its artifacts.

The same as `optuna-dashboard sqlite:///results/<study>/study.db --artifact-dir
results/<study>/artifacts`, served on the loopback interface: the trials with their notes
(the architecture in words and numbers), learning curves, the Pareto front, and each trial's
overlay and weights to view or download. Stop it with Ctrl+C.

optuna-dashboard has no login, and anyone who reaches it can edit or delete the study, so a
--host other than a loopback address is served with a warning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nas.commands.cli import command_parser, exit_code
from nas.search.serving import is_loopback, open_dashboard


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("dashboard", __doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/unet")
    parser.add_argument(
        "--port", type=_port, default=8080, help="port to serve on, 1-65535 (default: 8080)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="default: this machine only (there is no login)"
    )
    parser.add_argument("--storage", help="Optuna storage URL (default: the folder's study.db)")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def _port(text: str) -> int:
    port = int(text)  # argparse turns the ValueError into a usage error
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def exposure_warning(host: str, port: int) -> str | None:
    """The line to print before serving on `host`, or None on a loopback address."""
    if is_loopback(host):
        return None
    return (
        f"warning: --host {host!r} is not a loopback address, and optuna-dashboard has no "
        f"login: anyone who can reach port {port} can change or delete the study"
    )


def run(args: argparse.Namespace) -> int:
    dashboard = open_dashboard(args.results, args.storage)
    warning = exposure_warning(args.host, args.port)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    print(f"optuna-dashboard for {args.results} on http://{args.host}:{args.port}/", flush=True)
    dashboard.serve(args.host, args.port)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
