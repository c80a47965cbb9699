"""The one exception type for user mistakes: a bad file, a bad value, a bad request.

The command-line entry points print it in one line and exit with code 2; anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

from nas.core.secrets import scrub


class NasError(Exception):
    """A user-facing error about `source` (a file, a URL or a command-line option); a
    storage URL's password is hidden in both (nas/core/secrets.py), whoever built the message."""

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = scrub(str(source))
        self.reason = scrub(reason)
        super().__init__(f"{self.source}: {self.reason}")

    def __reduce__(self):  # raised in a worker process, it reaches the parent whole
        return type(self), (self.source, self.reason)


def validation_problem(err: Exception) -> str:
    """The first problem a pydantic ValidationError reports, as `field: message`, for a
    NasError's reason; other errors (TypeError, ValueError) as they say it."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(err)
