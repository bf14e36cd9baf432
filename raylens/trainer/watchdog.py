"""A stalled step fails its attempt, naming the rank.

A rank stuck in a collective (a peer that died or hung), a data read that never returns or a
deadlocked user module blocks in C code: no exception reaches Python, and every other rank waits
in its next collective. ``StallWatch`` is a daemon thread beside the loop: the loop marks where it
is (``beat``: a few attribute writes per batch); when a rank has not moved for ``timeout``
seconds its watch reports where it is, waits for its peers' watches to report too, then ends the
process, so Ray Train sees a failed worker and restarts the group from the latest checkpoint
(``max_failures``). The rank to blame is the least advanced one (``Stall.blame``): the others
went on to the collective where they wait for it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PHASES = ("loading its batch", "in forward", "in backward", "in the optimizer step")
"""Where in a step a rank can be, in the order it goes through them."""
BATCH, FORWARD, BACKWARD, OPTIMIZER = range(len(PHASES))


def poll_interval(timeout: float) -> float:
    """How often a watch looks: its peers' watches fire within one such interval of it."""
    return min(timeout / 10, 2.0)


def report_grace(timeout: float) -> float:
    """How long a fired watch keeps its process alive for its peers' reports, and how long the
    driver waits for them before naming the rank."""
    return 3 * poll_interval(timeout) + 1


@dataclass(frozen=True)
class Stall:
    """One rank's report that it has not moved for ``waited`` seconds."""

    rank: int
    epoch: int
    step: int
    phase: int
    waited: float
    timeout: float

    @property
    def progress(self) -> tuple[int, int]:
        return self.step, self.phase

    @staticmethod
    def blame(stalls: Sequence[Stall]) -> str:
        """Who stalled the run: the least advanced rank(s), where they were, and what follows."""
        least = min(s.progress for s in stalls)
        stuck = [s for s in stalls if s.progress == least]
        first = stuck[0]
        ranks = ", ".join(str(s.rank) for s in stuck)
        who = f"rank {ranks}" if len(stuck) == 1 else f"ranks {ranks}"
        others = sorted(s.rank for s in stalls if s.progress != least)
        waiting = f"; rank(s) {', '.join(map(str, others))} waited on it" if others else ""
        return (
            f"{who} made no progress for {first.waited:.0f} s, {PHASES[first.phase]} of step "
            f"{first.step + 1} (epoch {first.epoch + 1}){waiting} (train.step_timeout_s {first.timeout:g}): "
            "a hung collective, a stalled data read or a blocked model; the attempt fails and the "
            "run restarts from its latest checkpoint"
        )


class StallWatch:
    """Watches one rank's training progress; validation and checkpointing are not timed."""

    def __init__(
        self,
        timeout: float,
        rank: int,
        report: Callable[[Stall], None],
        end: Callable[[], None] | None = None,
    ) -> None:
        """``end``: what follows a report (default: end this process with SIGKILL)."""
        self.timeout, self.rank, self.report = timeout, rank, report
        self.end = end or _end_process
        self.last = time.monotonic()
        self.epoch = self.step = self.phase = 0
        # Timed from the first batch: reading data, building the model and joining the process
        # group (which waits for the slowest peer to start) are no step.
        self.paused = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"raylens-stall-watch-{rank}", daemon=True)
        self._thread.start()

    def beat(self, epoch: int, step: int, phase: int) -> None:
        """The loop moved on (to ``phase`` of the step after ``step`` optimizer steps)."""
        self.last, self.epoch, self.step, self.phase, self.paused = (
            time.monotonic(),
            epoch,
            step,
            phase,
            False,
        )

    def pause(self) -> None:
        """Validation and reporting follow: not timed until the next batch."""
        self.paused = True

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = poll_interval(self.timeout)
        while not self._stop.wait(poll):
            waited = time.monotonic() - self.last
            if self.paused or waited <= self.timeout:
                continue
            try:
                self.report(Stall(self.rank, self.epoch, self.step, self.phase, waited, self.timeout))
                # The peers' watches fire within a poll of this one: give their reports time to
                # leave before this process ends (Ray then ends the whole group).
                time.sleep(report_grace(self.timeout))
            finally:
                self.end()


def _end_process() -> None:
    # The loop is blocked in C code no exception can reach: end the process, which Ray Train
    # sees as a failed worker.
    os.kill(os.getpid(), signal.SIGKILL)
