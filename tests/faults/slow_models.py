"""User models whose training steps take a fixed time, or block once, so a test can interrupt a
run at a chosen stage. The delay is only paid in training mode: evaluation runs at full speed."""

import time
from pathlib import Path

import torch
import torch.distributed as dist
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


class StallsOnce(MLP):
    """On process-group rank ``rank``, the ``at``-th training forward blocks for ``seconds``
    unless ``marker`` exists (it is created first): a hang that a restart gets past."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        marker: str,
        at: int,
        rank: int,
        seconds: float,
        **params: object,
    ) -> None:
        super().__init__(in_features, out_features, **params)  # type: ignore[arg-type]
        self.marker, self.at, self.rank, self.seconds = Path(marker), at, rank, seconds
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            mine = dist.is_initialized() and dist.get_rank() == self.rank
            if self.calls == self.at and mine and not self.marker.exists():
                self.marker.touch()
                time.sleep(self.seconds)
        return super().forward(x)


def stalls_once(in_features: int, out_features: int, **params: object) -> nn.Module:
    return StallsOnce(in_features, out_features, **params)  # type: ignore[arg-type]


class FailsOnce(MLP):
    """The first training forward raises unless ``marker`` exists (it is created first): a
    failure a retried trial gets past."""

    def __init__(self, in_features: int, out_features: int, marker: str, **params: object) -> None:
        super().__init__(in_features, out_features, **params)  # type: ignore[arg-type]
        self.marker = Path(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError("a failure the retry gets past")
        return super().forward(x)


def fails_once(in_features: int, out_features: int, **params: object) -> nn.Module:
    return FailsOnce(in_features, out_features, **params)  # type: ignore[arg-type]
