"""A stalled step fails its attempt, naming the rank.

A rank stuck in a collective (a peer that died or hung), a data read that never returns or a
deadlocked user module blocks in C code: no exception reaches Python, and every other rank waits
in its next collective. ``StallWatch`` is a daemon thread beside the loop: the loop marks each
batch it finishes (``beat``: two attribute writes); when no batch has finished for ``timeout``
seconds, the watch says where the rank was and ends its process, so Ray Train sees a failed
worker and restarts the group from the latest checkpoint (``max_failures``). The rank that
stalled first is the one whose watch fires first: its peers finished their own batch and then
waited on it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable


class StallWatch:
    """Watches one rank's training progress; validation and checkpointing are not timed."""

    def __init__(self, timeout: float, rank: int, on_stall: Callable[[str], None]) -> None:
        self.timeout, self.rank, self.on_stall = timeout, rank, on_stall
        self.last = time.monotonic()
        self.where = "before its first batch"
        self.paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"raylens-stall-watch-{rank}", daemon=True)
        self._thread.start()

    def beat(self, epoch: int, step: int) -> None:
        """A batch finished (called by the loop)."""
        self.last, self.where, self.paused = time.monotonic(), f"after step {step} (epoch {epoch + 1})", False

    def pause(self) -> None:
        """Validation and reporting follow: not timed until the next batch."""
        self.paused = True

    def close(self) -> None:
        self._stop.set()

    def message(self, waited: float) -> str:
        return (
            f"rank {self.rank} made no progress for {waited:.0f} s {self.where} (train.step_timeout_s "
            f"{self.timeout:g}): a hung collective, a stalled data read or a blocked model; the "
            "attempt fails and the run restarts from its latest checkpoint"
        )

    def _watch(self) -> None:
        while not self._stop.wait(min(self.timeout / 4, 5.0)):
            waited = time.monotonic() - self.last
            if not self.paused and waited > self.timeout:
                try:
                    self.on_stall(self.message(waited))
                finally:
                    # The loop is blocked in C code no exception can reach: end the process, which
                    # Ray Train sees as a failed worker.
                    os.kill(os.getpid(), signal.SIGKILL)
