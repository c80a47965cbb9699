"""Open the Optuna storage a study lives in, from the URL users give.

- `sqlite:///path.db` (the default): one machine. Opened in WAL mode with a 60 s lock
  timeout, so a few local workers share it without "database is locked"; for many workers
  or a network file system use one of the two below.
- `postgresql+psycopg://user:password@host/db` (or `mysql+pymysql://...`): many hosts, one
  study: Optuna's own distributed engine, through SQLAlchemy.
- `journal:///relative/study.log` or `journal:////absolute/study.log` (like SQLite URLs):
  Optuna's JournalStorage on a file, for clusters that share only a file system.

Heartbeats (SQLite, PostgreSQL, MySQL): each running trial records a heartbeat every
`heartbeat_interval` seconds; a trial whose worker is silent for `grace_period` seconds is
marked FAIL by the next worker that starts a trial, and Optuna's
`RetryHeartbeatStaleTrialCallback` enqueues it again (`retries` times), so a killed worker
loses no trial. JournalStorage has no heartbeats in Optuna 5: a trial whose worker died
there stays RUNNING, and is neither counted nor retried.
"""

from __future__ import annotations

import sqlite3
import warnings
from pathlib import Path

import optuna
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from pydantic import BaseModel, ConfigDict, Field

from nas.errors import NasError
from nas.secrets import redact, register

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


def _open(url: str, heartbeat: HeartbeatConfig | None) -> BaseStorage:
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
