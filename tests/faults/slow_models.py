"""A user model whose training steps take a fixed time, so a test can interrupt a run at a
chosen stage. The delay is only paid in training mode: evaluation runs at full speed."""

import time

import torch
from torch import nn

from raylens.trainer.models import MLP


class SlowMLP(MLP):
    def __init__(
        self, in_features: int, out_features: int, step_seconds: float = 0.05, **params: object
    ) -> None:
        super().__init__(in_features, out_features, **params)  # type: ignore[arg-type]
        self.step_seconds = step_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.step_seconds)
        return super().forward(x)


def build(in_features: int, out_features: int, **params: object) -> nn.Module:
    return SlowMLP(in_features, out_features, **params)
