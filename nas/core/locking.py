"""One lock for files that several processes (workers, hosts on a shared disk) update.

`filelock` rather than fcntl: the same code locks on Linux, macOS and Windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block; wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield
