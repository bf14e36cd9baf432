"""What of a run lives in Ray Train's controller: a callback handing the driver the controller's
handle, and the kinds of message on the run's queue. Kept apart from ``ray_train`` so the
controller, which unpickles it, imports Ray alone, not torch's checkpoint code and raylens's
trainer (seconds of start-up on a small machine, before any worker starts).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

EPOCH, CONTROLLER, NOTICE, FAILED, STALLED, STOPPED, CHECKPOINT = (
    "epoch",
    "controller",
    "notice",
    "failed",
    "stalled",
    "stopped",
    "checkpoint",
)
"""Kinds of message on the queue from the run to the driver."""


class ControllerHandle(ControllerCallback):
    """Runs in the Train controller and hands the driver its actor handle, so an interrupted
    driver can abort the run (Ray registers its own abort only when ``fit`` runs on the main
    thread, and here it runs beside the loop that drains the queue)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_controller_start(self, train_run_context: Any) -> None:
        # Not ``queue.put``: a blocking get inside the controller's event loop would stall it.
        self.queue.actor.put_nowait.remote((CONTROLLER, ray.get_runtime_context().current_actor))  # type: ignore[attr-defined]


class CheckpointRelay(UserCallback):
    """Runs in the Train controller and hands the driver each checkpoint once Ray has persisted
    it (every worker reported, the upload ended), with rank 0's metrics: for a driver that
    passes checkpoints on (a Tune trial under PBT, whose scheduler clones them across trials)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is not None:
            self.queue.actor.put_nowait.remote((CHECKPOINT, (metrics[0], checkpoint)))  # type: ignore[attr-defined]
