"""Passwords kept out of everything nas prints or writes.

A storage URL may hold a password: `postgresql+psycopg://user:PASSWORD@host/db`, or
`...?password=PASSWORD`. The password of every URL a command is given (its options,
`NAS_STORAGE` among their defaults) or opens (nas/search/storage.py) is registered here once, and
`scrub(text)` replaces it with *** wherever it stands: in its URL, or alone, as a driver's
message may quote it, percent-decoded or not. Any other URL's `user:password@` and
`password=` are hidden as well. The outputs call `scrub` themselves, so that no caller has
to remember it: the console and run.log (nas/commands/cli.py, nas/search/console.py), every
NasError, the attrs of trials and studies (nas/search/record.py), and the text files nas renames
into place
(nas/core/staging.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import traceback
from collections.abc import Iterator
from typing import Any, TextIO
from urllib.parse import unquote, unquote_plus, urlsplit

HIDDEN = "***"
# A registered password shorter than this is hidden only in a URL and after password=: on its
# own it would match ordinary words and numbers of the output ("nas", "1234").
MIN_ALONE = 4

# user:password@ after a scheme, and password=... in a query string or a libpq connection
# string; neither runs past white space or a quote, so that they can be applied to any text.
_USER_PASSWORD = re.compile(r"(?<=://)([^\s/@:?#'\"]*):[^\s/@?#'\"]*@")
_QUERY_PASSWORD = re.compile(r"(?i)((?:^|[?&;\s])password=)[^\s&;#'\"]*")

_registered: set[str] = set()


def _passwords(url: str) -> set[str]:
    try:  # the authority's user:password@ up to its last @, white space and all
        found = {urlsplit(url).password or ""}
    except ValueError:  # not a URL (an unclosed IPv6 bracket): its text's password= and @
        found = {m.group(0).split(":", 1)[1][:-1] for m in _USER_PASSWORD.finditer(url)}
    found |= {m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(url)}
    found |= {unquote(s) for s in found} | {unquote_plus(s) for s in found}
    return {secret for secret in found if secret and secret != HIDDEN}


def register(url: str | None) -> None:
    """Hide the password(s) `url` holds, from now on, wherever `scrub` is applied."""
    if url:
        _registered.update(_passwords(url))


def _hide(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one may hold another
        if len(secret) >= MIN_ALONE:
            text = text.replace(secret, HIDDEN)
        else:  # where a URL holds it, white space or not
            text = text.replace(f":{secret}@", f":{HIDDEN}@")
            text = text.replace(f"password={secret}", f"password={HIDDEN}")
    text = _USER_PASSWORD.sub(rf"\1:{HIDDEN}@", text)
    return _QUERY_PASSWORD.sub(rf"\1{HIDDEN}", text)


def scrub(text: str) -> str:
    """`text` with every registered password, and any URL's password, replaced by ***."""
    return _hide(text, _registered)


def redact(url: str) -> str:
    """`url` with its password replaced by ***, to print or record where the URL was."""
    return _hide(url, _passwords(url))


def scrub_value(value: Any) -> Any:
    """`value` (a JSON-like attr: text, numbers, lists, mappings) with its texts scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {key: scrub_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(item) for item in value]
    return value


class _Scrubbed:
    """A text stream that scrubs what is written to it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(scrub(text))
        return len(text)

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding: the stream's
        return getattr(self.stream, name)


class _ScrubRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:  # the traceback, as formatters cache it
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def _scrubbed_traceback(kind, error, trace) -> None:
    traceback.print_exception(kind, error, trace, file=_Scrubbed(sys.stderr))


@contextlib.contextmanager
def scrubbed_console() -> Iterator[None]:
    """sys.stdout and sys.stderr scrubbed meanwhile, and the records of Optuna's log handler
    (which holds the stderr of its start); and from now on the traceback of an error that
    ends the process (printed after this block)."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _scrubbed_traceback
    out, err = sys.stdout, sys.stderr
    handlers = list(logging.getLogger("optuna").handlers)
    scrubbing = _ScrubRecords()
    sys.stdout, sys.stderr = _Scrubbed(out), _Scrubbed(err)
    for handler in handlers:
        handler.addFilter(scrubbing)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        for handler in handlers:
            handler.removeFilter(scrubbing)
