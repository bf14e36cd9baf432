"""The Ray Train bridge on a real local Ray cluster: 2 CPU workers over gloo."""

from pathlib import Path

import pytest
import torch

from raylens.features import FeatureSet
from raylens.trainer import Batches, ModelConfig, TrainConfig, TrainJob, build_model, evaluate
from raylens.trainer.parallel import load_checkpoint
from raylens.trainer.ray_train import train_distributed

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.parametrize("strategy", ["ddp"])  # FSDP numerics: tests/trainer/test_distributed.py
def test_two_workers_train_and_checkpoint_every_epoch(
    iris: FeatureSet, tmp_path: Path, strategy: str
) -> None:
    job = TrainJob.for_feature_set(
        ModelConfig(params={"hidden": [16]}),
        TrainConfig(
            epochs=3, batch_size=8, optimizer={"lr": 0.02}, scaling={"workers": 2, "strategy": strategy}
        ),
        iris,
    )
    seen: list[float] = []
    outcome = train_distributed(
        job, iris, run_name=f"t-{strategy}", storage_path=tmp_path, on_epoch=lambda m: seen.append(m["epoch"])
    )
    assert seen == [1.0, 2.0, 3.0]
    assert [m["epoch"] for m in outcome.history] == [1.0, 2.0, 3.0]
    assert outcome.history[-1]["valid_loss"] < outcome.history[0]["valid_loss"]
    state = load_checkpoint(outcome.checkpoint_dir)
    assert state["epoch"] == 3
    # The checkpoint holds the full, unwrapped model whatever the strategy sharded or wrapped.
    assert state["model"]["net.0.weight"].shape == torch.Size([16, 4])
    assert not any(key.startswith("module.") for key in state["model"])
    # Validation metrics reported by the workers (sharded under DDP, then all-reduced) are those
    # of the whole validation split.
    model = build_model(job.model, job.in_features, job.task.out_features)
    model.load_state_dict(state["model"])
    valid = iris.read("valid")
    whole = evaluate(model, Batches.from_numpy(valid.x, valid.y), job.task)
    assert outcome.history[-1]["valid_loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert outcome.history[-1]["valid_accuracy"] == pytest.approx(whole["accuracy"])
    kept = sorted(p.name for p in (tmp_path / f"t-{strategy}").glob("checkpoint_20*"))
    assert len(kept) == 2  # checkpoints_to_keep
