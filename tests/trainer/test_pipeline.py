"""Cutting a model into pipeline stages, checked without a process group (the training itself is
``test_distributed.py``'s, in 2 gloo processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raylens.trainer import TorchModelConfig, TrainConfig
from raylens.trainer.config import PipelineConfig
from raylens.trainer.models import build_model
from raylens.trainer.parallel.pipeline import PipelineError, check_cut, split_points


def mlp(hidden: list[int]) -> nn.Module:
    return build_model(TorchModelConfig(params={"hidden": hidden}), 4, 3)


def test_built_in_models_declare_where_stages_may_begin() -> None:
    assert mlp([8, 8, 8]).pipeline_split_points == ["net.2", "net.4", "net.6"]
    dropout = build_model(TorchModelConfig(params={"hidden": [8, 8], "dropout": 0.1}), 4, 3)
    assert dropout.pipeline_split_points == ["net.3", "net.6"]
    cnn = build_model(TorchModelConfig(name="cnn1d", params={"channels": [4, 8]}), 12, 3)
    assert cnn.pipeline_split_points == ["features.2", "head"]


def test_stages_are_balanced_by_parameters() -> None:
    # Layers of 4x64, 64x64, 64x64, 64x3 parameters: the middle is where half of them lie.
    model = mlp([64, 64, 64])
    assert split_points(model, 2) == ["net.4"]
    assert split_points(model, 4) == ["net.2", "net.4", "net.6"]
    # A point the user names is used as given; out of order, they are put in the forward's order.
    assert split_points(model, 3, ["net.6", "net.2"]) == ["net.2", "net.6"]


def test_a_cut_that_cannot_be_made_says_why_and_what_to_do() -> None:
    model = mlp([16])
    with pytest.raises(
        PipelineError,
        match=r"3 pipeline stages need 2 split point\(s\), and MLP has 1 \(net.2\): use at most 2 workers",
    ):
        split_points(model, 3)
    with pytest.raises(PipelineError, match=r"'net.7' name no module of MLP; its modules are: net, net\.0"):
        split_points(model, 2, ["net.7"])
    with pytest.raises(PipelineError, match="Sequential declares no pipeline split points"):
        split_points(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)), 2)


class Branchy(nn.Module):
    """A forward whose path depends on the data: torch.export cannot trace it into stages."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        if hidden.sum() > 0:
            hidden = hidden * 2
        return self.second(hidden)


def test_the_cut_is_traced_before_any_worker_starts() -> None:
    rows = torch.randn(4, 4)
    assert check_cut(mlp([8, 8]), rows, 2, PipelineConfig()) == ["net.2"]
    with pytest.raises(PipelineError, match="Branchy cannot be traced into pipeline stages"):
        check_cut(Branchy(), rows, 2, PipelineConfig(split_points=["second"]))


@pytest.mark.parametrize(
    ("scaling", "batch_size", "message"),
    [
        ({"workers": 1}, 16, "needs workers >= 2"),
        ({"workers": [2, 3]}, 16, "fixed for the run"),
        ({"workers": 2, "pipeline": {"microbatches": 3}}, 16, r"batch_size \(16\) is not a multiple"),
        ({"workers": 4, "pipeline": {"microbatches": 2}}, 16, "1f1b needs one microbatch per stage"),
        ({"workers": 3, "pipeline": {"split_points": ["net.2"]}}, 12, "names 1 point"),
    ],
)
def test_a_pipeline_spec_that_cannot_run_is_refused(scaling: dict, batch_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(batch_size=batch_size, scaling={"strategy": "pipeline", **scaling})
    # gpipe holds every microbatch's activations, and runs with fewer microbatches than stages.
    TrainConfig(
        batch_size=16,
        scaling={"strategy": "pipeline", "workers": 4, "pipeline": {"microbatches": 2, "schedule": "gpipe"}},
    )
