"""A study's storage served over the network: optuna-dashboard on one study, with its artifacts,
for people; Optuna's gRPC storage proxy on a whole storage, for workers on many hosts. Neither
has a login, so the commands warn unless the host is this machine only (`is_loopback`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.core.errors import NasError


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


@dataclass(frozen=True)
class Dashboard:
    """optuna-dashboard on a study, ready to serve: its storage's URL and its artifact store."""

    storage: str
    artifact_store: Any

    def serve(self, host: str, port: int) -> None:
        """Serve until stopped (Ctrl+C)."""
        import optuna_dashboard

        from nas.search.storage import open_storage

        # Through the one path (the lock timeout on SQLite); its notes go into the study's
        # storage only.
        optuna_dashboard.run_server(
            open_storage(self.storage, access="existing"),
            host=host,
            port=port,
            artifact_store=self.artifact_store,
        )


def open_dashboard(results: Path, storage: str | None) -> Dashboard:
    """The dashboard of the study in `results` (`storage`: its URL, default the folder's
    study.db); the study is read first, so a wrong folder is a clear error before serving."""
    from nas.search.study import default_storage, load_results_study
    from nas.search.trial_files import trial_files

    study = load_results_study(results, storage)  # a clear error before serving
    # The study's artifact store (a shared one when recorded): overlays and weights of trials
    # any host ran.
    store = trial_files(study, results).dashboard_store()
    return Dashboard(storage or default_storage(results), store)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that a process already listens on: gRPC binds with SO_REUSEPORT, so a
    second proxy there would start and take some of the first one's workers."""
    try:
        found = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise NasError("--host", f"{host!r} is no address here ({err.strerror})") from None
    family, kind, protocol, _, address = found[0]
    with socket.socket(family, kind, protocol) as probe:
        if os.name == "posix":  # a stopped proxy's closed connections do not hold the port
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise NasError("--port", f"{port} is in use on {host}") from None
            raise NasError("--host", f"cannot listen on {host} ({err.strerror})") from None


def grpc_host(host: str) -> str:
    """`host` as gRPC reads an address: an IPv6 address in brackets."""
    bare = host.strip("[]")
    return f"[{bare}]" if ":" in bare else bare


def open_proxied_storage(url: str, host: str, port: int) -> Any:
    """The storage at `url` as the proxy serves it, opened as `nas run` opens it behind
    Optuna's trial cache, once the URL is one a proxy can serve, grpcio is here and `port` is
    free on `host`."""
    import optuna

    from nas.search.storage import GRPC_PREFIX, JOURNAL_PREFIX, open_storage, redact, require_grpc

    if url.startswith(GRPC_PREFIX):
        raise NasError(
            redact(url),
            "is a storage proxy: serve the database itself (postgresql+psycopg://..., "
            "sqlite:///...)",
        )
    if url.startswith(JOURNAL_PREFIX):
        raise NasError(
            url,
            "Optuna's storage proxy does not serve a journal file (optuna/optuna#6084): "
            "serve SQLite or a database, or give the workers the journal itself",
        )
    require_grpc("nas storage-proxy")
    check_port_free(host, port)
    # Optuna's trial cache in front of the database, as Optuna asks of a proxy's storage.
    return optuna.storages.get_storage(open_storage(url))


def serve_proxy(storage: Any, host: str, port: int) -> None:
    """Optuna's gRPC proxy on `storage` until stopped (`host` as `grpc_host` spells it)."""
    import warnings

    import optuna

    with warnings.catch_warnings():  # marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.run_grpc_proxy_server(storage, host=host, port=port)
