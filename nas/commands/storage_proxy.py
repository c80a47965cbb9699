"""`nas storage-proxy --storage URL --port P`: serve one study storage to workers on many hosts.

Optuna's gRPC storage proxy: workers on any host run `nas run ... --storage
grpc://PROXY-HOST:P`, and only this process connects to the database, opened as `nas run`
opens it (SQLite in WAL mode, PostgreSQL and MySQL through SQLAlchemy) behind Optuna's trial
cache. Stop it with Ctrl+C or SIGTERM.

The proxy has no login, and anyone who reaches its port can change or delete every study in
the storage, so a --host other than a loopback address is served with a warning.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from nas.commands.cli import command_parser, exit_code
from nas.commands.dashboard import _port
from nas.core.errors import NasError
from nas.search.interrupts import Interrupted
from nas.search.serving import grpc_host, is_loopback, open_proxied_storage, serve_proxy
from nas.search.workers import STORAGE_ENV


def make_parser() -> argparse.ArgumentParser:
    parser = command_parser("storage-proxy", __doc__.split("\n")[0])
    parser.add_argument(
        "--storage",
        default=os.environ.get(STORAGE_ENV) or None,
        help=f"the Optuna storage URL to serve (default: ${STORAGE_ENV}, which keeps a "
        "password off the command line)",
    )
    parser.add_argument("--port", type=_port, required=True, help="port to serve on, 1-65535")
    parser.add_argument(
        "--host", default="127.0.0.1", help="default: this machine only (there is no login)"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def exposure_warning(host: str, port: int) -> str | None:
    """The line to print before serving on `host`, or None on a loopback address."""
    if is_loopback(host):
        return None
    return (
        f"warning: --host {host!r} is not a loopback address, and the storage proxy has no "
        f"login: anyone who can reach port {port} can change or delete every study it serves"
    )


def _stop(signum, frame) -> None:
    raise Interrupted(signum)


def run(args: argparse.Namespace) -> int:
    from nas.search.storage import redact

    if args.storage is None:
        raise NasError("--storage", f"is required (or ${STORAGE_ENV}): the storage to serve")
    storage = open_proxied_storage(args.storage, args.host, args.port)
    warning = exposure_warning(args.host, args.port)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    host = grpc_host(args.host)
    signal.signal(signal.SIGTERM, _stop)
    try:  # from the startup line on, which tells a caller the proxy is about to serve
        print(f"storage proxy for {redact(args.storage)} on grpc://{host}:{args.port}",
              flush=True)  # fmt: skip
        serve_proxy(storage, host, args.port)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Interrupted): nothing to continue
        print("storage proxy stopped; the study stays in its storage", file=sys.stderr,
              flush=True)  # fmt: skip
        return getattr(err, "exit_code", 130)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
