"""Open the Optuna storage a study lives in, from the URL users give.

- `sqlite:///path.db` (the default): one machine. Opened in WAL mode with a 60 s lock
  timeout, so a few local workers share it without "database is locked"; for many workers
  or a network file system use one of the two below.
- `postgresql+psycopg://user:password@host/db` (or `mysql+pymysql://...`): many hosts, one
  study: Optuna's own distributed engine, through SQLAlchemy.
- `journal:///relative/study.log` or `journal:////absolute/study.log` (like SQLite URLs):
  Optuna's JournalStorage on a file, for clusters that share only a file system.
- `grpc://HOST:PORT`: Optuna's GrpcStorageProxy, a client of the one `nas storage-proxy`
  process that holds the database connection for every worker (the `grpc` extra).

Heartbeats (SQLite, PostgreSQL, MySQL): each running trial records a heartbeat every
`heartbeat_interval` seconds; a trial whose worker is silent for `grace_period` seconds is
marked FAIL by the next worker that starts a trial, and Optuna's
`RetryHeartbeatStaleTrialCallback` enqueues it again (`retries` times), so a killed worker
loses no trial. JournalStorage and GrpcStorageProxy have no heartbeats in Optuna 5: there
nas records one on the trial itself (nas/liveness.py).
"""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.storages import (
    BaseStorage,
    GrpcStorageProxy,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from pydantic import BaseModel, ConfigDict, Field

from nas.errors import NasError
from nas.secrets import redact, register

GRPC_PREFIX = "grpc://"
GRPC_READY_TIMEOUT_S = 5  # how long a command waits for the storage proxy to answer
JOURNAL_PREFIX = "journal:///"
SQLITE_PREFIX = "sqlite:///"
SQLITE_LOCK_TIMEOUT_S = 60


class HeartbeatConfig(BaseModel):
    """heartbeat_interval / grace_period: seconds; retries: how often a lost trial reruns."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    heartbeat_interval: int = Field(30, ge=1)
    grace_period: int = Field(120, ge=2)
    retries: int = Field(1, ge=0)


def local_file(url: str) -> Path | None:
    """The file a SQLite or journal URL names (relative after ///, absolute after ////);
    None for a database server or an in-memory database."""
    for prefix in (SQLITE_PREFIX, JOURNAL_PREFIX):
        if url.startswith(prefix):
            path = url[len(prefix) :].split("?")[0]
            return Path(path) if path and path != ":memory:" else None
    return None


def _sqlite_wal(url: str) -> None:
    """Switch the database file to write-ahead logging (a setting stored in the file)."""
    path = local_file(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=SQLITE_LOCK_TIMEOUT_S) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def open_storage(url: str, heartbeat: HeartbeatConfig | None = None) -> BaseStorage:
    """The storage behind `url`, with heartbeats and retries when `heartbeat` is given. Its
    password is hidden from here on in all nas prints and writes (nas/secrets.py)."""
    register(url)
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _open(url, heartbeat)
    except NasError:
        raise
    except Exception as err:  # SQLAlchemy, drivers and Optuna raise many types for a bad URL
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise NasError(redact(url), f"cannot open the study storage ({reason})") from None


def grpc_address(url: str) -> tuple[str, int]:
    """The host (an IPv6 address in brackets) and port of a `grpc://HOST:PORT` URL."""
    parts = urlsplit(url)
    host, colon, port = parts.netloc.rpartition(":")
    example = "grpc://HOST:PORT, e.g. grpc://proxy-host:13000"
    if not colon or not host or parts.netloc.endswith("]"):
        raise NasError(url, f"names no port ({example})")
    if "@" in host or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise NasError(redact(url), f"is not {example}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise NasError(url, f"{port!r} is not a port (1-65535)")
    return host, int(port)


def require_grpc(where: str) -> None:
    """A NasError naming `where` unless grpcio, which Optuna imports on first use, is here."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise NasError(where, 'needs grpcio: pip install -e ".[grpc]"') from None


def _open_grpc(url: str) -> GrpcStorageProxy:
    """A client of the storage proxy at `url`, once the proxy answers."""
    host, port = grpc_address(url)
    require_grpc(url)
    proxy = GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=GRPC_READY_TIMEOUT_S)
    except ConnectionError:
        proxy.close()
        raise NasError(
            url,
            f"no storage proxy answers there within {GRPC_READY_TIMEOUT_S} s (start one on "
            f"{host} with: nas storage-proxy --storage URL --port {port})",
        ) from None
    return proxy


def _open(url: str, heartbeat: HeartbeatConfig | None) -> BaseStorage:
    if url.startswith(GRPC_PREFIX):  # no heartbeat options: nas/liveness.py keeps one
        return _open_grpc(url)
    if url.startswith(JOURNAL_PREFIX):
        path = local_file(url)
        if path is None:
            raise NasError(redact(url), "names no journal file")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    beats = {}
    if heartbeat is not None:
        beats = {
            "heartbeat_interval": heartbeat.heartbeat_interval,
            "grace_period": heartbeat.grace_period,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                max_retry=heartbeat.retries
            ),
        }
    engine_kwargs = {}
    if url.startswith(SQLITE_PREFIX):
        _sqlite_wal(url)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    return RDBStorage(url, engine_kwargs=engine_kwargs, **beats)


def load_study(url: str, name: str) -> optuna.Study:
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise NasError(redact(url), f"has no study named {name!r}") from None
