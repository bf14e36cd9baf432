"""Faults inside a Ray Train run, on a real local Ray cluster: a worker killed mid-epoch, and a
checkpoint that cannot be read back."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from raylens.features import FeatureSet
from raylens.trainer import ModelConfig, TrainConfig, TrainJob
from raylens.trainer.ray_train import train_distributed
from raylens.trainer.run import TrainRunResult, train_and_record
from raylens.trainer.tracking import MlflowTracker

pytestmark = pytest.mark.usefixtures("ray_cluster")

SLOW_MLP = ModelConfig(
    name="tests.faults.slow_models:build", params={"hidden": [16], "dropout": 0.2, "step_seconds": 0.05}
)


def job(iris: FeatureSet, epochs: int, *, max_failures: int = 1, keep: int = 2) -> TrainJob:
    return TrainJob.for_feature_set(
        SLOW_MLP,
        TrainConfig(
            epochs=epochs,
            batch_size=8,
            optimizer={"lr": 0.02},
            scaling={"workers": 2, "strategy": "ddp"},
            max_failures=max_failures,
            checkpoints_to_keep=keep,
        ),
        iris,
    )


def train_workers() -> list[int]:
    """Processes running Ray Train workers (Ray titles them ``ray::RayTrainWorker...``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::RayTrainWorker"):
                found.append(int(entry.name))
    return sorted(found)


def tracked_run(iris: FeatureSet, folder: Path, on_epoch) -> tuple[TrainRunResult, MlflowTracker]:  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True)
    tracker = MlflowTracker(f"sqlite:///{folder}/mlflow.db", "faults", folder / "artifacts")
    result = train_and_record(
        job(iris, 6),
        iris,
        tracker=tracker,
        run_name="final",
        storage_path=folder / "ray",
        params={},
        tags={},
        on_epoch=on_epoch,
    )
    return result, tracker


def test_a_worker_killed_mid_epoch_is_replaced_and_the_run_ends_as_if_it_never_happened(
    iris: FeatureSet, tmp_path: Path
) -> None:
    straight, _ = tracked_run(iris, tmp_path / "straight", lambda metrics: None)

    killed: list[int] = []

    def kill_a_worker(metrics: dict[str, float]) -> None:
        # Epoch 2 has been reported: the workers are in the middle of epoch 3.
        if metrics["epoch"] == 2 and not killed:
            victim = train_workers()[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    result, tracker = tracked_run(iris, tmp_path / "killed", kill_a_worker)

    assert killed, "no Ray Train worker was found to kill"
    assert result.test_metrics == straight.test_metrics  # dropout, DDP, a restart: bit-identical
    history = tracker.client.get_metric_history(result.run_id, "valid_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # the replayed epochs are logged once
    assert [m["valid_loss"] for m in result.history] == [m["valid_loss"] for m in straight.history]


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(
    iris: FeatureSet, tmp_path: Path
) -> None:
    train_distributed(job(iris, 2, keep=5), iris, run_name="r", storage_path=tmp_path)
    earlier, latest = sorted(p for p in (tmp_path / "r").glob("checkpoint_*") if p.is_dir())
    (latest / "checkpoint.pt").write_bytes(b"half an upload")
    earlier_bytes = (earlier / "checkpoint.pt").read_bytes()

    notices: list[str] = []
    outcome = train_distributed(
        job(iris, 4, keep=5), iris, run_name="r", storage_path=tmp_path, on_notice=notices.append
    )

    assert [m["epoch"] for m in outcome.history] == [2.0, 3.0, 4.0]  # epoch 2 trained again from epoch 1
    assert len(notices) == 1 and "latest checkpoint is unreadable" in notices[0], notices
    assert (earlier / "checkpoint.pt").read_bytes() == earlier_bytes

    # With no readable checkpoint left, the run fails saying so (not with a torch traceback).
    for checkpoint in (tmp_path / "r").glob("checkpoint_*/checkpoint.pt"):
        checkpoint.write_bytes(b"")
    with pytest.raises(Exception, match="no checkpoint of this run can be read"):
        train_distributed(job(iris, 5, max_failures=0), iris, run_name="r", storage_path=tmp_path)
