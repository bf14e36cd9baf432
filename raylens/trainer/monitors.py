"""Monitors that come with raylens: rules run by ``fit`` between steps and epochs that may stop
the run (``loop.Monitor``). Each is a small object over what it has seen, deciding by value."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from raylens.trainer.config import EarlyStoppingConfig
from raylens.trainer.decisions import GO_ON, Action, Decision

if TYPE_CHECKING:
    from raylens.trainer.loop import StepView


class EarlyStopping:
    """Stops after ``patience`` epochs in which the metric did not beat the best so far by
    ``min_delta`` (a NaN never does)."""

    every = 0  # epochs only

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.config = config
        self.best: float | None = None
        self.waited = 0

    def on_step(self, view: StepView) -> Decision:
        return GO_ON

    def on_epoch(self, metrics: dict[str, float]) -> Decision:
        config, value = self.config, metrics.get(self.config.metric, math.nan)
        better = not math.isnan(value) and (
            self.best is None
            or (
                value < self.best - config.min_delta
                if config.mode == "min"
                else value > self.best + config.min_delta
            )
        )
        if better:
            self.best, self.waited = value, 0
            return GO_ON
        self.waited += 1
        if self.waited < config.patience:
            return GO_ON
        return Decision(
            Action.STOP,
            f"early stopping: {config.metric} has not improved on {self.best} for {self.waited} "
            f"epoch{'s' if self.waited > 1 else ''} (patience {config.patience})",
        )


class FiniteLoss:
    """Fails the run when the training loss is NaN or infinite: every ``every`` steps (reading
    the loss waits for the device, so not after each one) and at each epoch's end (the epoch's
    mean loss, which any non-finite step makes non-finite)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every

    def on_step(self, view: StepView) -> Decision:
        if view.loss is None:  # a pipeline stage before the last: the last one decides
            return GO_ON
        value = float(view.loss)
        if math.isfinite(value):
            return GO_ON
        return _diverged(value, f"at step {view.step} (epoch {view.epoch + 1})")

    def on_epoch(self, metrics: dict[str, float]) -> Decision:
        value = metrics.get("train_loss", 0.0)
        if math.isfinite(value):
            return GO_ON
        return _diverged(value, f"in epoch {int(metrics['epoch'])}")


def _diverged(value: float, where: str) -> Decision:
    return Decision(
        Action.FAIL,
        f"the training loss became {value} {where}: the model diverged. Lower train.optimizer.lr, "
        "set train.clip_grad_norm (e.g. 1.0) or a warmup (train.schedule.warmup_epochs), or check "
        "the data for extreme values",
    )
