"""A study's trial files where every host that works on the study finds them.

A trial's files are its weights and training state (checkpoints/), and what nas.retrain
trains from it (retrained/, crossval/). Each host keeps them in its own results folder, the
only copy on one machine. A study that many hosts share records an artifact store when it
is created (`--artifacts URL` or `study.artifacts`): a folder every host mounts, or an
S3-compatible bucket through Optuna's `Boto3ArtifactStore`. Then every file nas writes into
the results folder is also uploaded there under a name that carries its SHA-256, and the
study records, per file, which upload is current and its digest (a system attr of the
study, one per file, so hosts never overwrite each other's records). A host that needs a
file another host wrote (to continue a promoted candidate, export, retrain, score) fetches
it into its results folder and checks it against the digest; a local copy that no longer
matches the record (a later retrain on another host) is fetched again.

The same store serves optuna-dashboard's artifacts (the overlays, the front's weights), so a
dashboard on any host shows them. A study with no store keeps all of this in the results
folder, as on one machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from nas.core.errors import NasError
from nas.core.staging import atomic_write

if TYPE_CHECKING:
    import optuna

# The study system attr that records the current upload of results/<study>/<relative path>.
RECORD_PREFIX = "nas:file:"
S3_PREFIX = "s3://"
FILE_PREFIX = "file://"
S3_EXTRA = 'pip install -e ".[s3]"'
LOCAL_ARTIFACTS_DIR = "artifacts"  # a study without a store: the dashboard's, in results/
_CHUNK = 1 << 20


def store_url(given: str, where: str = "--artifacts") -> str:
    """The canonical form of an artifact store the user named, as the study records it: an
    absolute `file:///…` folder (a plain path is one), or `s3://bucket[/prefix]`."""
    if given.startswith(S3_PREFIX):
        bucket = given[len(S3_PREFIX) :].split("/", 1)[0]
        if not bucket:
            raise NasError(where, f"{given!r} names no bucket (s3://BUCKET[/PREFIX])")
        return given.rstrip("/")
    if "://" in given and not given.startswith(FILE_PREFIX):
        scheme = given.split("://", 1)[0]
        raise NasError(
            where,
            f"{given!r}: unknown kind of artifact store {scheme!r} (a folder every host "
            "mounts, file:///FOLDER, or s3://BUCKET[/PREFIX])",
        )
    path = Path(given.removeprefix(FILE_PREFIX)).expanduser()
    if not str(path):
        raise NasError(where, "names no folder")
    return FILE_PREFIX + str(path.resolve())


class SharedFolderStore:
    """Optuna's file-system artifact store, laid out in folders by study, writing each file
    under a temporary name and renaming it, so a host on the same mount never reads half."""

    def __init__(self, folder: Path) -> None:
        from optuna.artifacts import FileSystemArtifactStore

        self.folder = folder
        self._store = FileSystemArtifactStore(folder)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._store.open_reader(artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = self._store._get_filepath(artifact_id)  # its check that the id stays inside
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _copy(content_body, tmp))

    def remove(self, artifact_id: str) -> None:
        self._store.remove(artifact_id)


class PrefixedStore:
    """An artifact store whose ids all start with `prefix` (an S3 key prefix)."""

    def __init__(self, store: Any, prefix: str) -> None:
        self._store, self._prefix = store, prefix

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._store.open_reader(self._prefix + artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._store.write(self._prefix + artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self._store.remove(self._prefix + artifact_id)


def _copy(reader: BinaryIO, path: Path) -> None:
    with open(path, "wb") as out:
        shutil.copyfileobj(reader, out, _CHUNK)


def open_store(url: str, where: str | None = None) -> Any:
    """The artifact store behind a canonical `url` (see `store_url`); a NasError naming
    `where` (the option or the study that gave it) when it is not there."""
    where = where or url
    if url.startswith(S3_PREFIX):
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise NasError(where, f"{url} is an S3 store, which needs boto3: {S3_EXTRA}") from None
        from optuna.artifacts import Boto3ArtifactStore

        bucket, _, prefix = url[len(S3_PREFIX) :].partition("/")
        store = Boto3ArtifactStore(bucket)
        return PrefixedStore(store, f"{prefix}/" if prefix else "")
    folder = Path(url.removeprefix(FILE_PREFIX))
    if not folder.is_dir():
        raise NasError(where, f"the artifact store {folder} is not there (not a folder)")
    return SharedFolderStore(folder)


def check_writable(store: Any, url: str, where: str) -> None:
    """Write, read back and remove a small file, so that a store nas cannot use is refused
    before the study records it."""
    import io

    from nas.core.staging import _prefix

    probe = f"{_prefix('probe').lstrip('.')}check"
    body = b"nas checks it can write here\n"
    try:
        store.write(probe, io.BytesIO(body))
        with store.open_reader(probe) as reader:
            back = reader.read()
        store.remove(probe)
    except Exception as err:  # file systems, S3 clients and Optuna raise many types
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0] or type(err).__name__
        raise NasError(where, f"cannot write to the artifact store {url} ({reason})") from None
    if back != body:
        raise NasError(where, f"the artifact store {url} gave back other bytes than written")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TrialFiles:
    """The trial files of one study on this host: `study_dir` holds the local copies; with a
    `store`, each file is also uploaded there and recorded in `study`."""

    study_dir: Path
    study: optuna.Study | None = None
    store: Any = None
    url: str | None = None
    _records: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def shared(self) -> bool:
        return self.store is not None

    def relative(self, path: Path) -> str:
        return Path(path).relative_to(self.study_dir).as_posix()

    def records(self, fresh: bool = True) -> dict[str, dict]:
        """{relative path: {"id", "sha256", "bytes"}} of the files uploaded and not dropped."""
        if not self.shared or self.study is None:
            return {}
        if fresh or self._records is None:
            attrs = self.study._storage.get_study_system_attrs(self.study._study_id)
            self._records = {
                key[len(RECORD_PREFIX) :]: value
                for key, value in attrs.items()
                if key.startswith(RECORD_PREFIX) and isinstance(value, dict)
            }
        return self._records

    def _record(self, relative: str, value: dict | None) -> None:
        key = RECORD_PREFIX + relative
        self.study._storage.set_study_system_attr(self.study._study_id, key, value)

    def publish(self, path: Path) -> None:
        """Upload `path` (just written in the results folder) and record it as current; the
        upload it replaces is removed. OSError or NasError when the store refuses it."""
        if not self.shared:
            return
        relative = self.relative(path)
        digest = sha256(path)
        stem, dot, suffix = Path(relative).name.partition(".")
        name = f"{stem}.{digest[:16]}{dot}{suffix}"
        artifact_id = f"{self.study.study_name}/{Path(relative).parent.as_posix()}/{name}"
        artifact_id = artifact_id.replace("/./", "/")
        before = self.records().get(relative)
        with open(path, "rb") as handle:
            self.store.write(artifact_id, handle)
        self._record(relative, {"id": artifact_id, "sha256": digest,
                                "bytes": path.stat().st_size})  # fmt: skip
        if before and before.get("id") != artifact_id:
            self._remove(before["id"])

    def _remove(self, artifact_id: str) -> None:
        from optuna.artifacts.exceptions import ArtifactNotFound

        with contextlib.suppress(ArtifactNotFound, OSError):  # gone: another host dropped it
            self.store.remove(artifact_id)

    def drop(self, path: Path, records: dict[str, dict] | None = None) -> None:
        """Remove `path` here and, when recorded, from the store (`records`: read once by a
        caller that drops many)."""
        path.unlink(missing_ok=True)
        if not self.shared:
            return
        relative = self.relative(path)
        record = (self.records() if records is None else records).get(relative)
        if record is not None:
            self._record(relative, None)
            self._remove(record["id"])

    def local(self, path: Path, records: dict[str, dict] | None = None) -> Path | None:
        """`path` in this results folder as the study last recorded it, fetched from the
        store when it is missing here or differs from the record; None when neither here nor
        recorded. A NasError when the store lost it or holds other bytes than recorded."""
        record = None
        if self.shared:
            record = (self.records() if records is None else records).get(self.relative(path))
        if record is None:
            return path if path.is_file() else None
        if path.is_file() and sha256(path) == record["sha256"]:
            return path
        try:
            self._fetch(path, record)
        except NasError:  # replaced by another host meanwhile (the old upload removed)?
            again = self.records().get(self.relative(path))
            if again is None or again == record:
                raise
            self._fetch(path, again)
        return path

    def _fetch(self, path: Path, record: dict) -> None:
        """The recorded upload, renamed into place at `path` once its digest is checked."""
        from optuna.artifacts.exceptions import ArtifactNotFound

        def download(tmp: Path) -> None:
            try:
                with self.store.open_reader(record["id"]) as reader:
                    _copy(reader, tmp)
            except ArtifactNotFound:
                raise NasError(
                    self.url, f"has lost {record['id']} ({self.relative(path)} of the study)"
                ) from None
            found = sha256(tmp)
            if found != record["sha256"]:
                raise NasError(
                    self.url,
                    f"{record['id']} does not match the SHA-256 the study recorded for it "
                    f"({found[:16]}… against {record['sha256'][:16]}…)",
                )

        atomic_write(path, download)

    def any_under(self, folder: Path) -> bool:
        """Whether a file under `folder` is here or recorded."""
        if folder.is_dir() and any(folder.iterdir()):
            return True
        prefix = self.relative(folder) + "/"
        return any(key.startswith(prefix) for key in self.records())

    def dashboard_store(self) -> Any:
        """Where optuna-dashboard's artifacts go: the shared store, else results/artifacts."""
        if self.shared:
            return self.store
        from optuna.artifacts import FileSystemArtifactStore

        folder = self.study_dir / LOCAL_ARTIFACTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return FileSystemArtifactStore(str(folder))


def trial_files(study: optuna.Study | None, study_dir: Path) -> TrialFiles:
    """The trial files of `study` on this host, through the store the study recorded."""
    from nas.search.record import StudyRecord

    url = StudyRecord.of(study).artifacts if study is not None else None
    if not url:
        return TrialFiles(study_dir, study)
    return TrialFiles(study_dir, study, open_store(url, f"study {study.study_name!r}"), url)
