"""Monitors that come with raylens: rules run by ``fit`` between steps and epochs that may stop
the run (``loop.Monitor``). Each is a small object over what it has seen, deciding by value."""

from __future__ import annotations

import math

from raylens.trainer.config import EarlyStoppingConfig
from raylens.trainer.loop import GO_ON, Action, Decision, StepView


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
