"""nas writes only into what it made or was told to make: another program's SQLite file, an
empty study.db, a file that is not a database and an in-memory URL are refused in one line,
byte for byte unchanged; a real study read by export, report, retrain or the dashboard keeps
its database's bytes and time stamp and gets no -wal or -shm file; a results folder whose
name holds `?` or `{}` gets its database there, and `nas report .` works from inside it."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import optuna
import pytest

from nas.core.errors import NasError
from nas.search.storage import close_storages, load_study, open_storage, sqlite_url
from tests.conftest import run_cli, tiny_space_yaml, user_error

SIBLINGS = ("", "-wal", "-shm", "-journal")  # a SQLite file and what it may keep beside it
# The commands that read a study (retrain writes only its own companion studies, and only
# into a storage that holds the study), each with options that keep it cheap.
READERS = {
    "nas.report": (),
    "nas.export": ("--best", "--format", "none"),
    "nas.retrain": ("--trials", "0", "--epochs", "1"),
    "nas.dashboard": ("--port", "8765"),
}


def _state(database: Path) -> dict[str, tuple[str, int]]:
    """{file name: (sha256, mtime in ns)} of a SQLite file and the files beside it."""
    state = {}
    for suffix in SIBLINGS:
        path = database.with_name(database.name + suffix)
        if path.exists():
            state[path.name] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                path.stat().st_mtime_ns,
            )
    return state


def _foreign(path: Path) -> Path:
    """A small database of another program: one table with rows."""
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        connection.executemany(
            "INSERT INTO notes (text) VALUES (?)", [(f"note {i}",) for i in range(20)]
        )
    connection.close()
    return path


def _results_with(tmp_path: Path, content: bytes | None, name: str = "unet") -> Path:
    """results/<name>/ holding study.db with `content` (another program's database if None)."""
    folder = tmp_path / "results" / name
    folder.mkdir(parents=True)
    if content is None:
        _foreign(folder / "study.db")
    else:
        (folder / "study.db").write_bytes(content)
    return folder


# --- another program's file, an empty file, not a database: refused, unchanged -------------


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "another program's SQLite database (tables: notes)"),
        (b"", "is an empty database"),
        (b"name,score\nA,1\n", "is not a SQLite database"),
    ],
    ids=["foreign", "empty", "text"],
)
def test_a_reading_command_refuses_a_study_db_it_did_not_make_and_leaves_it_alone(
    tmp_path, command, content, reason
):
    folder = _results_with(tmp_path, content)
    before = _state(folder / "study.db")
    result = run_cli(command, "results/unet", *READERS[command], cwd=tmp_path)
    assert reason in user_error(result)
    assert "study.db" in user_error(result)
    assert _state(folder / "study.db") == before  # bytes, time stamp, no -wal or -shm
    assert sorted(p.name for p in folder.iterdir()) == ["study.db"]


@pytest.mark.parametrize("command", READERS)
def test_a_reading_command_refuses_another_programs_database_given_as_storage(tmp_path, command):
    foreign = _foreign(tmp_path / "app.db")
    folder = tmp_path / "results" / "unet"
    folder.mkdir(parents=True)
    before = _state(foreign)
    result = run_cli(
        command, "results/unet", "--storage", "sqlite:///app.db", *READERS[command], cwd=tmp_path
    )
    assert "app.db: is another program's SQLite database" in user_error(result)
    assert _state(foreign) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "results"]


@pytest.mark.parametrize("command", ["nas.report", "nas.export", "nas.retrain"])
def test_a_storage_that_does_not_exist_is_not_created_by_a_reading_command(tmp_path, command):
    (tmp_path / "results" / "unet").mkdir(parents=True)
    for url, missing in [
        ("sqlite:///gone/study.db", "gone"),
        ("journal:///study.log", "study.log"),
    ]:
        result = run_cli(command, "results/unet", "--storage", url, *READERS[command], cwd=tmp_path)
        assert "does not exist" in user_error(result)
        assert not (tmp_path / missing).exists()


def test_nas_run_refuses_another_programs_database_and_a_file_that_is_not_one(
    tmp_path, tiny_dataset
):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=1))
    foreign = _foreign(tmp_path / "app.db")
    (tmp_path / "notes.db").write_text("not a database\n")
    cases = {
        "app.db": "is another program's SQLite database",
        "notes.db": "is not a SQLite database",
    }
    before = {name: _state(tmp_path / name) for name in cases}
    for name, reason in cases.items():
        result = run_cli("nas.run", "space.yaml", "--storage", f"sqlite:///{name}", cwd=tmp_path)
        assert f"{name}: {reason}" in user_error(result)
    assert {name: _state(tmp_path / name) for name in cases} == before
    assert not (tmp_path / "results").exists()  # refused before the study's folder is made
    assert len(sqlite3.connect(foreign).execute("SELECT * FROM notes").fetchall()) == 20


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite+pysqlite:///:memory:",
        "sqlite:///file:s.db?uri=true",
    ],
)
def test_nas_run_refuses_an_in_memory_database(tmp_path, tiny_dataset, url):
    (tmp_path / "space.yaml").write_text(tiny_space_yaml(tiny_dataset, n_trials=1))
    result = run_cli("nas.run", "space.yaml", "--storage", url, cwd=tmp_path)
    line = user_error(result)
    assert "in-memory database" in line or "URI filename" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


def test_an_empty_file_given_to_create_a_study_becomes_one_and_a_foreign_one_never(tmp_path):
    """An empty file holds nobody's data: Optuna and SQLite read it as an empty database, and
    so does nas when told to create a study there. Another program's database is refused."""
    (tmp_path / "new.db").touch()
    study = optuna.create_study(
        storage=open_storage(sqlite_url(tmp_path / "new.db")), study_name="s"
    )
    assert study.study_name == "s"
    assert {"studies", "trials"} <= {
        name
        for (name,) in sqlite3.connect(tmp_path / "new.db").execute(
            "SELECT name FROM sqlite_master"
        )
    }
    foreign = _foreign(tmp_path / "app.db")
    before = _state(foreign)
    for access in ("create", "existing", "read"):
        with pytest.raises(NasError, match="another program's SQLite database"):
            open_storage(sqlite_url(foreign), access=access)
    assert _state(foreign) == before


def test_a_study_opened_to_read_cannot_be_written(tmp_path):
    url = sqlite_url(tmp_path / "study.db")
    optuna.create_study(storage=open_storage(url), study_name="s").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2
    )
    close_storages()
    before = _state(tmp_path / "study.db")
    study = load_study(url, "s")
    assert len(study.trials) == 2
    for write in (lambda: study.set_user_attr("note", 1), lambda: study.enqueue_trial({"x": 0.5})):
        with pytest.raises(optuna.exceptions.StorageInternalError) as refused:
            write()
        assert "readonly database" in str(refused.value.__cause__)
    close_storages()
    assert _state(tmp_path / "study.db") == before
    assert len(load_study(url, "s").trials) == 2


# --- a real study: read without a change; `?` and `{}` in its folder's path; `nas report .` ---


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory, tiny_dataset) -> Path:
    """A finished one-trial study in results 'res?x{1}%' (characters a URL would misread)."""
    root = tmp_path_factory.mktemp("study")
    space = tiny_space_yaml(tiny_dataset, "tiny", n_trials=1).replace("epochs: 2", "epochs: 1")
    (root / "space.yaml").write_text(space.replace("batches_per_epoch: 3", "batches_per_epoch: 1"))
    result = run_cli("nas.run", "space.yaml", "--results-dir", "res?x{1}%", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "res?x{1}%" / "tiny"


@pytest.mark.slow
def test_a_results_path_with_url_characters_keeps_its_database_inside(study_folder):
    root = study_folder.parents[1]
    assert sorted(p.name for p in root.iterdir()) == ["res?x{1}%", "space.yaml"]  # no stray `res`
    assert (study_folder / "study.db").stat().st_size > 0
    assert len(load_study(sqlite_url(study_folder / "study.db"), "tiny").trials) == 1
    close_storages()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["nas.report", "nas.export", "nas.retrain"])
def test_a_reading_command_changes_nothing_in_the_study_database(study_folder, command):
    database = study_folder / "study.db"
    before = _state(database)
    assert list(before) == ["study.db"]
    options = {"nas.retrain": ("--trials", "99")}.get(command, READERS[command])  # refused late
    result = run_cli(command, str(study_folder.relative_to(study_folder.parents[1])), *options,
                     cwd=study_folder.parents[1])  # fmt: skip
    if command == "nas.retrain":
        assert "has no trial '99'" in user_error(result)
    else:
        assert result.returncode == 0, result.stderr
    assert _state(database) == before  # bytes, time stamp, and no -wal or -shm left


@pytest.mark.slow
def test_the_dashboards_storage_is_the_study_unchanged(study_folder):
    database = study_folder / "study.db"
    before = _state(database)
    storage = open_storage(sqlite_url(database), access="existing")  # what the dashboard serves
    assert [s.study_name for s in storage.get_all_studies()] == ["tiny"]
    close_storages()
    assert _state(database) == before


@pytest.mark.slow
@pytest.mark.parametrize("command", ["nas.report", "nas.export"])
def test_a_command_given_dot_reads_the_study_of_the_folder_it_runs_in(study_folder, command):
    before = _state(study_folder / "study.db")
    result = run_cli(command, ".", *READERS[command], cwd=study_folder)
    assert result.returncode == 0, result.stderr
    assert (study_folder / ("report.html" if command == "nas.report" else "export")).exists()
    assert _state(study_folder / "study.db") == before


def test_a_url_names_its_file_whatever_characters_the_folders_hold(tmp_path):
    for name in ("a?b", "c%41d", "e{f}g", "h#i j"):
        database = tmp_path / name / "study.db"
        optuna.create_study(storage=open_storage(sqlite_url(database)), study_name="s")
        close_storages()
        assert database.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a?b", "c%41d", "e{f}g", "h#i j"]


@pytest.mark.slow
def test_a_database_server_is_read_only_as_a_study_storage_and_never_given_tables(
    tmp_path, postgres_url
):
    import sqlalchemy

    (tmp_path / "results" / "unet").mkdir(parents=True)
    for command in (
        "nas.report",
        "nas.export",
    ):  # a database with no study: refused
        result = run_cli(command, "results/unet", "--storage", postgres_url, *READERS[command],
                         cwd=tmp_path)  # fmt: skip
        assert "holds no Optuna study storage" in user_error(result)
    engine = sqlalchemy.create_engine(postgres_url)
    assert sqlalchemy.inspect(engine).get_table_names() == []  # no table was created
    optuna.create_study(storage=open_storage(postgres_url), study_name="unet")
    study = load_study(postgres_url, "unet")  # read-only
    with pytest.raises(optuna.exceptions.StorageInternalError) as refused:
        study.set_user_attr("note", 1)
    assert "read-only transaction" in str(refused.value.__cause__)
    assert load_study(postgres_url, "unet").user_attrs == {}
    close_storages()
    engine.dispose()
