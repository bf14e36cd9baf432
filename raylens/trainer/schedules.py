"""Learning-rate schedules as pure functions of the optimizer step.

The loop sets each parameter group's learning rate from ``rate(step)`` before every optimizer
step, instead of keeping a ``torch.optim.lr_scheduler`` object: the rate depends on the step
alone, so a resumed run (which knows its step from the epochs it completed) follows the schedule
exactly, with no scheduler state to checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from raylens.trainer.config import ScheduleConfig

Rate = Callable[[int], float]
"""The learning rate for optimizer step ``step`` (0-based) of the run."""


def learning_rate(schedule: ScheduleConfig, peak: float, epochs: int, steps_per_epoch: int) -> Rate:
    """The rate of ``schedule`` for a run of ``epochs`` x ``steps_per_epoch`` optimizer steps."""
    total = epochs * steps_per_epoch
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    floor = peak * schedule.min_lr_ratio

    def rate(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        if schedule.name == "constant":
            return peak
        if schedule.name == "step":
            assert schedule.step_epochs is not None
            return peak * schedule.gamma ** (step // (schedule.step_epochs * steps_per_epoch))
        # The decay runs from the first step after warmup (progress 0) to the last step (1).
        progress = (step - warmup) / max(1, total - warmup - 1)
        if schedule.name == "linear":
            return peak + (floor - peak) * progress
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return rate
