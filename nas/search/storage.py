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
nas records one on the trial itself (nas/search/liveness.py).

nas writes only into a storage it made or was told to make (`access`): `nas run` makes a
missing or empty SQLite file an Optuna database and refuses one of another program; the
commands that read a study find Optuna's tables already there, create and migrate none, and
read through connections that cannot write. An in-memory database is refused: the study
would end with the command.
"""

from __future__ import annotations

import sqlite3
import time
import warnings
import weakref
from pathlib import Path
from typing import Literal
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
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import make_url

from nas.core.errors import NasError
from nas.core.secrets import redact, register

GRPC_PREFIX = "grpc://"
GRPC_READY_TIMEOUT_S = 5  # how long a command waits for the storage proxy to answer
JOURNAL_PREFIX = "journal:///"
SQLITE_PREFIX = "sqlite:///"
SQLITE_LOCK_TIMEOUT_S = 60
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
# Tables every Optuna RDB storage holds: a database with them is a study storage.
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info", "alembic_version"})

# "create": nas run and the storage proxy, which make the study; "existing": retrain's
# companion studies and the dashboard, which write into a storage that holds the study;
# "read": export and report, which write nothing.
Access = Literal["create", "existing", "read"]
# Statements that make a connection read-only, by SQLAlchemy dialect.
READ_ONLY = {
    "sqlite": "PRAGMA query_only = ON",
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
}
# The database storages opened in this process, whose connections a command closes when it
# ends (close_storages), as does a storage that is dropped: a SQLite file in WAL mode keeps
# -wal and -shm files beside it while a connection is open.
_opened: weakref.WeakSet[RDBStorage] = weakref.WeakSet()


class HeartbeatConfig(BaseModel):
    """heartbeat_interval / grace_period: seconds; retries: how often a lost trial reruns."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    heartbeat_interval: int = Field(30, ge=1)
    grace_period: int = Field(120, ge=2)
    retries: int = Field(1, ge=0)


def sqlite_url(path: Path) -> str:
    """The SQLite URL of the database file `path`, whatever characters its folders hold:
    SQLAlchemy reads `?` as the start of a query and decodes `%XX`, and Optuna fills `{...}`
    in a URL, so these are percent-encoded."""
    text = str(path)
    for char, code in (("%", "%25"), ("?", "%3F"), ("{", "%7B"), ("}", "%7D")):
        text = text.replace(char, code)
    return SQLITE_PREFIX + text


def _sqlite(url: str):
    """The parsed URL when `url` names a SQLite database (any driver), else None."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 (not a URL SQLAlchemy reads: opening it says why)
        return None
    return parsed if parsed.get_backend_name() == "sqlite" else None


def local_file(url: str) -> Path | None:
    """The file a SQLite or journal URL names (relative after ///, absolute after ////), as
    SQLAlchemy decodes it for SQLite; None for a database server or an in-memory database."""
    if url.startswith(JOURNAL_PREFIX):
        path = url[len(JOURNAL_PREFIX) :].split("?")[0]
        return Path(path) if path else None
    parsed = _sqlite(url)
    if parsed is None or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _check_sqlite_url(url: str) -> Path:
    """The database file of a SQLite URL, or a NasError for a URI filename (nas checks and
    opens files by path) or an in-memory database (the study would end with the command)."""
    if _sqlite(url).query.get("uri", "").lower() in ("true", "1"):
        raise NasError(redact(url), "is a SQLite URI filename (uri=true): give the file's path, "
                       "e.g. sqlite:///results/study.db")  # fmt: skip
    path = local_file(url)
    if path is None:
        raise NasError(redact(url), "is an in-memory database: the study would be lost when the "
                       "command ends; give a file, e.g. sqlite:///results/study.db")  # fmt: skip
    return path


def sqlite_tables(path: Path) -> set[str] | None:
    """The tables of an existing SQLite file; None when it is not a SQLite database. Read
    through a connection that cannot write (a file in WAL mode gets -wal and -shm files while
    it is open, removed when it closes)."""
    if path.stat().st_size == 0:
        return set()  # SQLite reads an empty file as an empty database
    with open(path, "rb") as handle:
        if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            return None
    connection = sqlite3.connect(path, timeout=SQLITE_LOCK_TIMEOUT_S)
    try:
        connection.execute("PRAGMA query_only = ON")
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}
    except sqlite3.DatabaseError as err:
        raise NasError(path, f"is not a readable SQLite database ({err})") from None
    finally:
        connection.close()


def _check_sqlite_file(path: Path, access: Access) -> None:
    """A NasError unless `path` may be opened for `access`: an Optuna database, or, for
    "create", a missing or empty file (SQLite's and Optuna's own reading of an empty file;
    nobody's data is in it). Another program's database is never touched."""
    if not path.exists():
        if access == "create":
            return
        raise NasError(path, "does not exist: a study's database is read, never created here")
    if not path.is_file():
        raise NasError(path, "is not a file: a study's storage is a SQLite database file")
    tables = sqlite_tables(path)
    if tables is None:
        raise NasError(path, "is not a SQLite database: nas writes only into an Optuna study's "
                       "database (give another file)")  # fmt: skip
    if OPTUNA_TABLES.issubset(tables):
        return
    if tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise NasError(path, f"is another program's SQLite database (tables: {shown}), not an "
                       "Optuna study's: nas leaves it alone (give another file)")  # fmt: skip
    if access != "create":
        raise NasError(path, "is an empty database: it holds no study")


def check_sqlite(url: str, access: Access = "create") -> Path | None:
    """The database file of a SQLite URL, once it may be opened for `access` (a NasError
    naming it otherwise); None for any other storage. Opens nothing for writing: `nas run`
    asks before it reads the data, so that a refusal comes at once."""
    if _sqlite(url) is None:
        return None
    path = _check_sqlite_url(url)
    _check_sqlite_file(path, access)
    return path


def _check_tables(url: str, engine_kwargs: dict) -> None:
    """A NasError unless the database server's database at `url` holds Optuna's tables."""
    engine = create_engine(url, **engine_kwargs)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if not OPTUNA_TABLES.issubset(tables):
        raise NasError(redact(url), "holds no Optuna study storage (its tables are missing)")


def _sqlite_wal(path: Path) -> None:
    """Switch the database file to write-ahead logging (a setting stored in the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path, timeout=SQLITE_LOCK_TIMEOUT_S) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def _read_only(storage: RDBStorage) -> None:
    """Every connection `storage` makes from now on cannot write."""
    statement = READ_ONLY.get(storage.engine.dialect.name)
    if statement is None:
        return

    @event.listens_for(storage.engine, "connect")
    def _connect(connection, record) -> None:
        cursor = connection.cursor()
        cursor.execute(statement)
        cursor.close()

    storage.engine.dispose()  # the connections opened before this hook


def close_storages() -> None:
    """Close the idle connections of every database storage opened in this process (a
    command does when it ends): a SQLite file in WAL mode loses its -wal and -shm files,
    which exist while a connection is open. A storage still in use reconnects."""
    for storage in list(_opened):
        storage.engine.dispose()


def open_storage(
    url: str, heartbeat: HeartbeatConfig | None = None, *, access: Access = "create"
) -> BaseStorage:
    """The storage behind `url`, with heartbeats and retries when `heartbeat` is given. Its
    password is hidden from here on in all nas prints and writes (nas/core/secrets.py).

    access: "create" makes Optuna's tables where there are none yet (a SQLite file: missing
    or empty, never another program's database); "existing" needs them there already and
    creates or migrates nothing; "read" as "existing", through connections that cannot write.
    """
    register(url)
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _open(url, heartbeat, access)
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


def _open(url: str, heartbeat: HeartbeatConfig | None, access: Access) -> BaseStorage:
    if url.startswith(GRPC_PREFIX):  # no heartbeat options: nas/search/liveness.py keeps one
        return _open_grpc(url)
    if url.startswith(JOURNAL_PREFIX):
        path = local_file(url)
        if path is None:
            raise NasError(redact(url), "names no journal file")
        if access != "create" and not path.is_file():
            raise NasError(path, "does not exist: a study's journal is read, never created here")
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
    path = check_sqlite(url, access)
    if path is not None:
        if access == "create":
            _sqlite_wal(path)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    elif access != "create":
        _check_tables(url, engine_kwargs)
    storage = _rdb_storage(url, engine_kwargs, access != "create", beats)
    _opened.add(storage)
    weakref.finalize(storage, storage.engine.dispose)  # its connections close with it
    if access == "read":
        _read_only(storage)
    return storage


def _rdb_storage(url: str, engine_kwargs: dict, skip_tables: bool, beats: dict) -> RDBStorage:
    """Optuna's RDBStorage. Two processes that open a new database at once (workers, or a
    reader that looks while the run creates it) both create Optuna's tables and stamp its
    schema version; the one that stamps second fails on the unique version row, and the one
    that creates a table second (between SQLAlchemy's check and its CREATE) fails on "table
    ... already exists", although the schema it wanted is there. It opens again, up to three
    times."""
    import sqlalchemy.exc

    for attempt in range(3):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=skip_tables,
                              **beats)  # fmt: skip
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as err:
            lost_race = isinstance(err, sqlalchemy.exc.IntegrityError) or (
                "already exists" in str(err.orig)
            )
            if attempt == 2 or not lost_race:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def load_study(url: str, name: str, access: Access = "read") -> optuna.Study:
    """Study `name` of the storage at `url`, which must hold it (read-only by default)."""
    storage = open_storage(url, access=access)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise NasError(redact(url), f"has no study named {name!r}") from None
