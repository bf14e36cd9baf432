"""One interruption path for the CLI: SIGINT (Ctrl-C) and SIGTERM (a scheduler, `kill`) both
raise ``Interrupted`` in the main thread, wherever the invocation is — except inside a write to
the tracking store (``raylens.interrupts.deferred_interrupts``), where it waits for the write.

Every stage turns that into the same ending: its open MLflow runs are marked KILLED, nothing is
registered, the run folder keeps its checkpoints and record, and the CLI exits 130 (SIGINT) or
143 (SIGTERM) saying how to resume. The sweep hands both signals to Tune's own graceful stop
first (``raylens.tuning.sweep``), so an interrupted sweep is saved resumable, never reported
as finished.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from raylens.interrupts import Interrupted, hold

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``Interrupted``; the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        if not hold(signum):  # inside a write to the tracking store: raised when it is done
            raise Interrupted(signum)

    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
