"""Write a file or a folder under a temporary name beside its destination, then rename it
into place, so that no reader ever sees half of it; and clean up what a killed process left.

Temporary names start with a dot and carry the writer's host and process id
(`.NAME.HOST-PID.RANDOM`), so a later run can tell a leftover of a dead process on this host
from a file another live worker is still writing. What is renamed into place gets the usual
permissions (0666 or 0777 less the umask), not the owner-only ones of a temporary file, so
colleagues can read results and exported models where the umask lets them. A text file
(by its suffix: a table, a card, a report) has storage passwords hidden before it is renamed
into place (nas/core/secrets.py), whatever it quotes.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from nas.core.secrets import scrub

TEXT_SUFFIXES = frozenset({".csv", ".html", ".json", ".log", ".md", ".txt", ".yaml", ".yml"})


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def _prefix(name: str) -> str:
    return f".{name}.{_host()}-{os.getpid()}."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_permissions(path: Path, folder: bool) -> None:
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _scrub_text_file(path: Path) -> None:
    """Rewrite a text file with storage passwords hidden; other files are left as written."""
    if path.suffix.lower() not in TEXT_SUFFIXES:
        return
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    hidden = scrub(text)
    if hidden != text:
        path.write_bytes(hidden.encode("utf-8", errors="surrogateescape"))


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, flush it to disk, and rename it
    over `path`; on any failure `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _scrub_text_file(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _usual_permissions(Path(tmp), folder=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def staging_folder(destination: Path) -> Iterator[Path]:
    """An empty folder beside `destination` to fill; removed on the way out unless the block
    renamed it into place (see `replace_folder`)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(destination.name), dir=destination.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: Path, destination: Path) -> None:
    """Move a filled staging folder to `destination`, replacing what is there."""
    for path in staging.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _scrub_text_file(path)
    _usual_permissions(staging, folder=True)
    if destination.is_dir() and not destination.is_symlink():
        shutil.rmtree(destination)
    elif destination.exists() or destination.is_symlink():
        destination.unlink()
    os.replace(staging, destination)


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (someone else's counts). Not
    os.kill(pid, 0): on Windows that terminates the process."""
    return psutil.pid_exists(pid)


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the temporary files and folders that dead processes of this host left in
    `folder`; those of live processes and of other hosts are kept. Returns what was removed."""
    if not folder.is_dir():
        return []
    removed = []
    ours = re.compile(rf"^\..+\.{re.escape(_host())}-(?P<pid>\d+)\.")
    for entry in folder.iterdir():
        match = ours.match(entry.name)
        if not match or process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_output_folder(folder: Path) -> None:
    """Refuse, before any work, an output folder that cannot be made or written: one that is
    a file, lies below a file, or whose nearest existing folder is not writable."""
    from nas.core.errors import NasError

    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.is_symlink() and not path.exists():
            raise NasError(folder, f"cannot be made: {path} is a dangling link")
        if not path.exists():
            continue
        if not path.is_dir():
            where = "is a file" if path == folder else f"lies below the file {path}"
            raise NasError(folder, f"{where}, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise NasError(folder, f"cannot be written: {path} is not writable")
        return
