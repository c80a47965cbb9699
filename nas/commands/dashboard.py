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
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path

from nas.commands.cli import command_parser, exit_code


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


def is_loopback(host: str) -> bool:
    """Whether `host` is localhost or a loopback address (127.0.0.0/8, ::1); any other name
    may resolve to an address that other machines reach."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


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
    import optuna_dashboard

    from nas.search.storage import open_storage
    from nas.search.study import default_storage, load_results_study
    from nas.search.trial_files import trial_files

    study = load_results_study(args.results, args.storage)  # a clear error before serving
    # The study's artifact store (a shared one when recorded): overlays and weights of trials
    # any host ran.
    store = trial_files(study, args.results).dashboard_store()

    storage = args.storage or default_storage(args.results)
    warning = exposure_warning(args.host, args.port)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    print(f"optuna-dashboard for {args.results} on http://{args.host}:{args.port}/", flush=True)
    optuna_dashboard.run_server(  # through the one path: the lock timeout on SQLite
        open_storage(storage, access="existing"),  # its notes: into the study's storage only
        host=args.host,
        port=args.port,
        artifact_store=store,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
