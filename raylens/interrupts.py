"""Stop signals, and the short stretches of work that must not be cut in half by one.

``Interrupted`` is what SIGINT (Ctrl-C) and SIGTERM become in the CLI (``raylens.cluster.interrupt``
installs the handlers). A handler that raises at an arbitrary point can land inside a write to
the tracking store: SQLite is then left mid-transaction, the store stays locked, and the
interruption ends as a "database is locked" crash with runs never closed. Code that writes
runs ``with deferred_interrupts():`` — a signal arriving there is held and raised when the
block ends. Lives outside the four packages, like ``raylens.errors``: every layer uses it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT from Ctrl-C, SIGTERM from a scheduler or `kill`).

    A ``KeyboardInterrupt``, so every ``except KeyboardInterrupt`` that marks runs KILLED treats
    both signals alike; ``exit_code`` is the shell's convention, 128 + the signal number.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_depth = 0
_held: list[int] = []


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back a stop signal until the block ends (main thread; nested blocks hold until the
    outermost ends). Only signal handlers that consult ``hold`` defer; others act at once."""
    global _depth
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        _depth += 1
    try:
        yield
    finally:
        if on_main:
            _depth -= 1
    if on_main and _depth == 0 and _held:
        signum = _held[0]
        _held.clear()
        raise Interrupted(signum)


def hold(signum: int) -> bool:
    """For a signal handler: keep ``signum`` for the end of the current deferred block and return
    True, or return False when no block is open (then the handler raises at once)."""
    if _depth > 0:
        _held.append(signum)
        return True
    return False


def pending() -> bool:
    """Whether a stop signal is being held for the end of the current deferred block."""
    return bool(_held)
