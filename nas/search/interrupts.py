"""Ctrl-C and SIGTERM in a search run: one exception, `Interrupted`, carrying the exit code
(130 or 143), so that the trial under way is recorded as interrupted, results/ is written,
and what finished is kept."""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: abandon the trial, write results/, exit 130 or 143."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.exit_code = 128 + signum


def catch_interrupts() -> None:
    """From now on, Ctrl-C and SIGTERM raise `Interrupted` (the caller restores the handlers
    it had)."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame) -> None:
    """The first Ctrl-C or SIGTERM interrupts; later ones are ignored, so that none lands in
    the middle of recording the abandoned trial (which would leave it RUNNING)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)
