"""The Ray Train bridge's one-worker path: on embedded Ray a 1-worker CPU run trains in the
driver's process. It must keep what a Ray Train run promises: every epoch heard once, in order;
checkpoints in the run folder, the latest ``checkpoints_to_keep`` of them; a resume that ends
with the weights an uninterrupted run ends with; ``max_failures`` restarts after an error.
No Ray cluster is started: the driver needs none to train."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from torch import nn

from raylens.features import FeatureSet
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob
from raylens.trainer.config import ScalingConfig
from raylens.trainer.family import TrainingFailed
from raylens.trainer.loop import Batches, evaluate
from raylens.trainer.metrics import predicted_metrics
from raylens.trainer.models import MLP, build_model
from raylens.trainer.parallel import load_checkpoint, load_model_weights, rng_state
from raylens.trainer.ray_train import TrainOutcome, checkpoint_folders, train_distributed, trains_in_driver
from raylens.trainer.run import train_and_record
from raylens.trainer.torch_family import TorchPredictor
from raylens.trainer.tracking import MlflowTracker

EPOCHS = 5


class FailsOnce(MLP):
    """An MLP whose ``fail_at``-th training step raises, unless ``marker`` exists (it is created
    then): a transient error, which a restart from the latest checkpoint gets past."""

    def __init__(self, in_features: int, out_features: int, marker: str, fail_at: int, **params: Any) -> None:
        super().__init__(in_features, out_features, **params)
        self.marker, self.fail_at, self.steps = Path(marker), fail_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if self.steps == self.fail_at and not self.marker.exists():
                self.marker.touch()
                raise RuntimeError("a transient fault")
        return super().forward(x)


def fails_once(in_features: int, out_features: int, **params: Any) -> nn.Module:
    return FailsOnce(in_features, out_features, **params)


def job(
    iris: FeatureSet, marker: Path, *, fail_at: int = 0, max_failures: int = 2, keep: int = 2
) -> TrainJob:
    """Dropout, so a resume that lost the random state would end with other weights."""
    return TrainJob.for_feature_set(
        TorchModelConfig(
            name=f"{__name__}:fails_once",
            params={"hidden": [16], "dropout": 0.2, "marker": str(marker), "fail_at": fail_at},
        ),
        TrainConfig(
            epochs=EPOCHS,
            batch_size=8,
            optimizer={"lr": 0.02},
            checkpoints_to_keep=keep,
            max_failures=max_failures,
        ),
        iris,
    )


def train(job: TrainJob, iris: FeatureSet, storage: Path, **listeners: Any) -> TrainOutcome:
    return train_distributed(job, iris, run_name="final", storage_path=storage, embedded=True, **listeners)


def uninterrupted(iris: FeatureSet, tmp_path: Path) -> tuple[TrainOutcome, dict[str, torch.Tensor]]:
    (tmp_path / "never-fails").touch()
    outcome = train(job(iris, tmp_path / "never-fails"), iris, tmp_path / "uninterrupted")
    return outcome, load_checkpoint(outcome.checkpoint_dir)["model"]


def assert_same_weights(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name


def test_only_one_cpu_worker_on_embedded_ray_trains_in_the_driver(iris: FeatureSet, tmp_path: Path) -> None:
    one = job(iris, tmp_path / "m")
    assert trains_in_driver(one, embedded=True)
    assert not trains_in_driver(one, embedded=False)  # another cluster places its worker itself
    scaling = one.train.scaling
    for other in ({"workers": 2}, {"use_gpu": True}):
        changed = one.train.model_copy(update={"scaling": scaling.model_copy(update=other)})
        assert not trains_in_driver(TrainJob(one.model, changed, one.task, one.in_features), embedded=True)


def test_interrupted_and_resumed_in_the_driver_ends_with_the_uninterrupted_weights(
    iris: FeatureSet, tmp_path: Path
) -> None:
    ray_before = ray.is_initialized()  # other tests of the session may have started one
    reference, reference_model = uninterrupted(iris, tmp_path)
    assert [m["epoch"] for m in reference.history] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert reference.run_path == str(tmp_path / "uninterrupted" / "final")
    assert ray.is_initialized() == ray_before  # trained without starting a Ray cluster

    (tmp_path / "m").touch()
    storage, run = tmp_path / "interrupted", tmp_path / "interrupted" / "final"
    heard: list[dict[str, float]] = []

    def stop_after_epoch_2(metrics: dict[str, float]) -> None:
        heard.append(metrics)
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt  # Ctrl-C, as the CLI raises it, after epoch 2's report

    threads, random_state = torch.get_num_threads(), rng_state()
    with pytest.raises(KeyboardInterrupt):
        train(job(iris, tmp_path / "m"), iris, storage, on_epoch=stop_after_epoch_2)
    assert [m["epoch"] for m in heard] == [1.0, 2.0]
    assert [load_checkpoint(f)["epoch"] for f in checkpoint_folders(run)] == [1, 2]  # committed first
    assert [
        p.name for p in run.iterdir() if not p.name.startswith("checkpoint_")
    ] == []  # nothing half-written
    # The driver's own thread count and random state are its own again.
    assert torch.get_num_threads() == threads
    assert torch.equal(rng_state()["torch"], random_state["torch"])

    resumed = train(job(iris, tmp_path / "m"), iris, storage, on_epoch=heard.append)
    assert [m["epoch"] for m in heard] == [1.0, 2.0, 3.0, 4.0, 5.0]  # each epoch heard once
    assert [m["epoch"] for m in resumed.history] == [3.0, 4.0, 5.0]
    assert heard[2:] == resumed.history and set(heard[0]) == set(reference.history[0])
    for ours, theirs in zip(heard, reference.history, strict=True):  # timings aside, the same metrics
        assert {k: v for k, v in ours.items() if not k.endswith("_per_s")} == {
            k: v for k, v in theirs.items() if not k.endswith("_per_s")
        }
    kept = checkpoint_folders(run)
    assert [load_checkpoint(f)["epoch"] for f in kept] == [4, 5]  # checkpoints_to_keep: 2
    assert resumed.checkpoint_dir == kept[-1] and resumed.run_path == str(run)
    assert_same_weights(load_checkpoint(resumed.checkpoint_dir)["model"], reference_model)

    # A finished run resumed again trains nothing and hands back its last checkpoint.
    again = train(job(iris, tmp_path / "m"), iris, storage)
    assert again.history == [] and again.checkpoint_dir == kept[-1]


def test_an_error_in_training_restarts_from_the_latest_checkpoint_up_to_max_failures(
    iris: FeatureSet, tmp_path: Path
) -> None:
    reference, reference_model = uninterrupted(iris, tmp_path)
    heard: list[dict[str, float]] = []
    notices: list[str] = []
    steps_per_epoch = math.ceil(len(iris.read("train")) / 8)
    # It fails at epoch 3's first step; every checkpoint is kept, to see what was trained.
    flaky = job(iris, tmp_path / "failed-once", fail_at=2 * steps_per_epoch + 1, keep=10)
    outcome = train(flaky, iris, tmp_path / "restarted", on_epoch=heard.append, on_notice=notices.append)
    assert (tmp_path / "failed-once").exists()
    assert len(notices) == 1 and "RuntimeError: a transient fault" in notices[0], notices
    assert "failure 1 of max_failures 2" in notices[0]
    assert [m["epoch"] for m in heard] == [1.0, 2.0, 3.0, 4.0, 5.0]
    # It went on from epoch 2's checkpoint: no epoch was trained (and checkpointed) twice.
    epochs = [load_checkpoint(f)["epoch"] for f in checkpoint_folders(tmp_path / "restarted" / "final")]
    assert epochs == [1, 2, 3, 4, 5]
    assert [m["valid_loss"] for m in outcome.history] == [m["valid_loss"] for m in reference.history]
    assert_same_weights(load_checkpoint(outcome.checkpoint_dir)["model"], reference_model)

    # max_failures: 0 lets the error through, as Ray Train's failure policy does.
    with pytest.raises(RuntimeError, match="a transient fault"):
        train(job(iris, tmp_path / "fails", fail_at=1, max_failures=0), iris, tmp_path / "no-restarts")


def test_an_error_of_the_listener_is_not_a_training_failure(iris: FeatureSet, tmp_path: Path) -> None:
    """The driver's own error (the tracker's, say) ends the run at once: nothing is retrained."""
    (tmp_path / "m").touch()
    calls: list[float] = []

    def broken(metrics: dict[str, float]) -> None:
        calls.append(metrics["epoch"])
        raise ValueError("the tracking store is gone")

    with pytest.raises(ValueError, match="the tracking store is gone"):
        train(job(iris, tmp_path / "m"), iris, tmp_path / "ray", on_epoch=broken)
    assert calls == [1.0]


def diverging(workers: int, iris: FeatureSet) -> TrainJob:
    return TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16]}),
        TrainConfig(
            epochs=20,
            batch_size=8,
            optimizer={"name": "sgd", "lr": 1e6, "momentum": 0.9},
            scaling={"workers": workers, "strategy": "ddp"},
            max_failures=2,
        ),
        iris,
    )


def test_a_diverged_run_in_the_driver_fails_at_once_not_retried(iris: FeatureSet, tmp_path: Path) -> None:
    notices: list[str] = []
    with pytest.raises(TrainingFailed, match="the training loss became"):
        train_distributed(
            diverging(1, iris),
            iris,
            run_name="nan",
            storage_path=tmp_path,
            on_notice=notices.append,
            embedded=True,
        )
    assert notices == []  # no restart: from any checkpoint it would diverge again


@pytest.mark.usefixtures("ray_cluster")
def test_a_diverged_run_of_ray_train_workers_fails_with_its_reason(iris: FeatureSet, tmp_path: Path) -> None:
    epochs: list[dict[str, float]] = []
    with pytest.raises(TrainingFailed, match=r"the training loss became .*Lower train\.optimizer\.lr"):
        train_distributed(
            diverging(2, iris), iris, run_name="nan", storage_path=tmp_path, on_epoch=epochs.append
        )
    assert len(epochs) < 20


@pytest.mark.usefixtures("ray_cluster")
def test_an_elastic_run_starts_with_the_workers_the_cluster_has_room_for(
    iris: FeatureSet, tmp_path: Path
) -> None:
    """workers: [2, 16] of 1.3 CPUs on the session's 4-CPU cluster: Ray Train starts as many as
    fit (3 where the cluster is idle), at least 2; the checkpoint holds one random state per rank,
    so it says how many trained."""
    job = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [8]}),
        TrainConfig(
            epochs=2, batch_size=16, scaling={"workers": [2, 16], "strategy": "ddp", "cpus_per_worker": 1.3}
        ),
        iris,
    )
    outcome = train_distributed(job, iris, run_name="elastic", storage_path=tmp_path)
    assert [m["epoch"] for m in outcome.history] == [1.0, 2.0]
    ranks = len(load_checkpoint(outcome.checkpoint_dir)["rng"])
    assert 2 <= ranks <= 3


@pytest.mark.usefixtures("ray_cluster")
def test_a_pipeline_on_ray_train_saves_sharded_checkpoints_and_trains_what_one_process_trains(
    iris: FeatureSet, tmp_path: Path
) -> None:
    """Two Ray Train workers, one stage each: every rank's shard lands in the same checkpoint
    folder (nothing gathered on rank 0), the driver reads the whole model from the shards, and
    the losses are those of one process stepping over the same batches."""
    pipelined = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16, 16]}),
        TrainConfig(
            epochs=3,
            batch_size=18,
            scaling={"workers": 2, "strategy": "pipeline", "pipeline": {"microbatches": 2}},
            best_checkpoint={"metric": "valid_accuracy", "mode": "max"},
            checkpoints_to_keep=1,
        ),
        iris,
    )
    outcome = train_distributed(pipelined, iris, run_name="pipeline", storage_path=tmp_path)
    # The best by valid_accuracy (the earliest of ties) is kept beside the latest.
    assert outcome.best is not None
    top = max(m["valid_accuracy"] for m in outcome.history)
    best_epoch = min(m["epoch"] for m in outcome.history if m["valid_accuracy"] == top)
    assert outcome.best[1]["epoch"] == best_epoch
    assert {outcome.best[0], outcome.checkpoint_dir} == set(checkpoint_folders(Path(outcome.run_path)))
    files = {p.name for p in outcome.checkpoint_dir.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng_0.pt", "rng_1.pt", "sharded.json"} <= files
    assert "checkpoint.pt" not in files

    single = replace(pipelined, train=pipelined.train.model_copy(update={"scaling": ScalingConfig()}))
    reference = train_distributed(single, iris, run_name="single", storage_path=tmp_path, embedded=True)
    for ours, theirs in zip(outcome.history, reference.history, strict=True):
        for key in ("train_loss", "valid_loss"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
    whole, expected = build_model(pipelined.model, 4, 3), build_model(pipelined.model, 4, 3)
    load_model_weights(whole, outcome.checkpoint_dir)
    load_model_weights(expected, reference.checkpoint_dir)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(whole.state_dict()[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_the_best_checkpoints_by_a_metric_are_kept_beside_the_latest_in_the_driver(
    iris: FeatureSet, tmp_path: Path
) -> None:
    """A learning rate high enough for valid_loss to go up and down: the 2 best epochs by it are
    kept, with the newest (a resume starts from it), and the best is the one to register."""
    noisy = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16]}),
        TrainConfig(
            epochs=8,
            batch_size=8,
            optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.9},
            best_checkpoint={"metric": "valid_loss"},
            checkpoints_to_keep=2,
        ),
        iris,
    )
    outcome = train_distributed(noisy, iris, run_name="best", storage_path=tmp_path, embedded=True)
    losses = {m["epoch"]: m["valid_loss"] for m in outcome.history}
    two_best = sorted(sorted(losses, key=losses.__getitem__)[:2])
    kept = checkpoint_folders(Path(outcome.run_path))
    assert [load_checkpoint(f)["epoch"] for f in kept] == sorted({*map(int, two_best), 8})
    assert len(set(losses.values())) == len(losses) and two_best != [7.0, 8.0]  # not just the latest
    assert outcome.best is not None and outcome.best[0] in kept
    assert outcome.best[1]["epoch"] == min(losses, key=losses.__getitem__)


def test_the_run_tests_and_logs_the_best_checkpoints_model(iris: FeatureSet, tmp_path: Path) -> None:
    """With best_checkpoint, the test split is scored with the best checkpoint's weights, not the
    last epoch's, and the run says which epoch they are from."""
    noisy = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16]}),
        TrainConfig(
            epochs=6,
            batch_size=8,
            optimizer={"name": "sgd", "lr": 1.0, "momentum": 0.9},  # valid_loss best at epoch 2
            best_checkpoint={"metric": "valid_loss"},
        ),
        iris,
    )
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "best", tmp_path / "artifacts")
    result = train_and_record(
        noisy,
        iris,
        tracker=tracker,
        run_name="best",
        storage_path=tmp_path / "ray",
        params={},
        tags={},
        embedded=True,
    )
    losses = {m["epoch"]: m["valid_loss"] for m in result.history}
    best_epoch = min(losses, key=losses.__getitem__)
    assert best_epoch != 6.0  # the last epoch's model would be another
    assert tracker.client.get_run(result.run_id).data.tags["raylens.model_epoch"] == f"{best_epoch:g}"
    folder = next(
        f
        for f in checkpoint_folders(Path(tmp_path / "ray" / "best"))
        if load_checkpoint(f)["epoch"] == best_epoch
    )
    model = build_model(noisy.model, 4, 3)
    load_model_weights(model, folder)
    test = iris.read("test")
    expected = predicted_metrics(TorchPredictor(model, noisy.task), test.x, test.y, noisy.task)["loss"]
    assert result.test_metrics["test_loss"] == pytest.approx(expected, rel=1e-9)
    whole = evaluate(model, Batches.from_numpy(test.x, test.y), noisy.task)["loss"]  # the loop's, in float32
    assert result.test_metrics["test_loss"] == pytest.approx(whole, rel=1e-5)


@pytest.mark.usefixtures("ray_cluster")
def test_a_streamed_split_deals_each_worker_an_equal_shuffled_share_of_the_stored_rows(
    iris: FeatureSet,
) -> None:
    """Ray Data as the workers read it: two shards of equal rows, together the stored rows
    (less what an equal split drops), each row's features packed into one tensor as stored, and
    each epoch in another order."""
    from raylens.trainer.ray_train import RayDataBatches, streamed_dataset

    stored = iris.read("train")
    by_row = {tuple(row): label for row, label in zip(stored.x.tolist(), stored.y.tolist(), strict=True)}
    shards = streamed_dataset(iris).streaming_split(2, equal=True)
    rows = len(stored.y) // 2

    def read(rank: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        stream = RayDataBatches(shards[rank], rows, torch.device("cpu"), seed=rank, target=torch.int64)
        return [list(stream.epoch(epoch, batch_size=16)) for epoch in (0, 1)]

    # The shards are read side by side, as the workers read them (Ray Data deals blocks to both).
    with ThreadPoolExecutor(2) as pool:
        read_by_rank = list(pool.map(read, range(2)))
    seen: list[list[tuple[float, ...]]] = []
    for epochs in read_by_rank:
        for batches in epochs:
            assert [len(y) for _, y in batches][:-1] == [16] * (len(batches) - 1)
            assert sum(len(y) for _, y in batches) == rows
        first, second = ([tuple(r) for x, _ in batches for r in x.tolist()] for batches in epochs)
        assert sorted(first) == sorted(second) and first != second  # the same rows, reshuffled
        for x, y in epochs[0]:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert [by_row[tuple(r)] for r in x.tolist()] == y.tolist()
        seen.append(first)
    assert not set(seen[0]) & set(seen[1])  # no row in both shards


@pytest.mark.usefixtures("ray_cluster")
def test_two_workers_train_from_a_streamed_split(iris: FeatureSet, tmp_path: Path) -> None:
    job = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16]}),
        TrainConfig(epochs=2, batch_size=8, optimizer={"lr": 0.05}, data="ray_data", scaling={"workers": 2}),
        iris,
    )
    assert not trains_in_driver(job, embedded=True)  # Ray Train deals the stream to its workers
    outcome = train_distributed(job, iris, run_name="streamed", storage_path=tmp_path, embedded=True)
    assert [m["epoch"] for m in outcome.history] == [1.0, 2.0]
    assert outcome.history[-1]["train_loss"] < outcome.history[0]["train_loss"]
    assert outcome.history[-1]["valid_accuracy"] > 0.7
    assert len(load_checkpoint(outcome.checkpoint_dir)["rng"]) == 2
    # Resumed with a longer run: from the epoch-end checkpoint, only the epoch that is left.
    longer = TrainJob(job.model, job.train.model_copy(update={"epochs": 3}), job.task, job.in_features)
    resumed = train_distributed(longer, iris, run_name="streamed", storage_path=tmp_path, embedded=True)
    assert [m["epoch"] for m in resumed.history] == [3.0]


def test_a_stream_is_refused_where_a_run_needs_every_row_or_a_mid_epoch_resume() -> None:
    with pytest.raises(ValueError, match="a pipeline's stages share every batch"):
        TrainConfig(data="ray_data", scaling={"workers": 2, "strategy": "pipeline"})
    with pytest.raises(ValueError, match="cannot resume in the middle of one"):
        TrainConfig(data="ray_data", eval_every_steps=10)
