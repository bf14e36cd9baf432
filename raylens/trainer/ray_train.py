"""The Ray Train bridge: launch N workers that each run the same job, carry reports and checkpoints.

Ray Train only launches processes, sets up the process group and persists checkpoints; the
training itself is ``run_worker``. Rank 0 also puts each epoch's metrics on a queue, so the
driver (the one writer to the tracker) sees them live and can draw progress.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointUploadMode
from ray.util.queue import Empty, Queue

from raylens.features import FeatureSet
from raylens.trainer.job import TrainJob, run_worker
from raylens.trainer.loop import TrainState
from raylens.trainer.parallel import gather_checkpoint, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class TrainOutcome:
    """Where the final checkpoint lies and the metrics of every epoch, in order."""

    checkpoint_dir: Path
    history: list[dict[str, float]]
    run_path: str


class RayTrainReporter:
    """Reports through ``ray.train.report``; rank 0 writes the checkpoint and feeds the driver."""

    def __init__(self, rank: int, queue: Queue | None) -> None:
        self.rank = rank
        self.queue = queue

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        full_state = gather_checkpoint(state.model, state.optimizer, state.epoch)  # collective
        checkpoint = None
        if self.rank == 0:
            # Ray uploads it in the background and deletes the folder after: training goes on
            # while the controller collects the report.
            folder = Path(tempfile.mkdtemp(prefix="raylens-checkpoint-"))
            save_checkpoint(full_state, folder)
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        if self.rank == 0 and self.queue is not None:
            self.queue.put_nowait(metrics)


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    job: TrainJob = config["job"]
    torch.set_num_threads(max(1, round(job.train.scaling.cpus_per_worker)))
    feature_set = FeatureSet(Path(config["feature_set_path"]), config["manifest"])
    resume_from = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume_from = load_checkpoint(Path(folder))
    run_worker(
        job,
        feature_set.read("train"),
        feature_set.read("valid"),
        RayTrainReporter(rank, config.get("queue")),
        rank=rank,
        world_size=world_size,
        device=ray.train.torch.get_device(),
        resume_from=resume_from,
    )


def train_distributed(
    job: TrainJob,
    feature_set: FeatureSet,
    *,
    run_name: str,
    storage_path: Path,
    on_epoch: Callable[[dict[str, float]], None] = lambda metrics: None,
) -> TrainOutcome:
    """Train with ``job.train.scaling.workers`` Ray Train workers; resume if ``run_name`` has a
    checkpoint under ``storage_path`` already."""
    scaling = job.train.scaling
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = ray.train.torch.TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "job": job,
            "feature_set_path": str(feature_set.path),
            "manifest": feature_set.manifest,
            "queue": queue,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.train.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=job.train.max_failures),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome["error"] = exc

    # fit() blocks, so it runs beside the loop that drains live metrics for the caller.
    thread = threading.Thread(target=fit, name="raylens-fit", daemon=True)
    thread.start()
    history: list[dict[str, float]] = []

    def drain(block: bool) -> None:
        while True:
            try:
                metrics = queue.get(block=block, timeout=0.5) if block else queue.get_nowait()
            except Empty:
                return
            history.append(metrics)
            on_epoch(metrics)

    while thread.is_alive():
        drain(block=True)
    drain(block=False)
    queue.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if result.checkpoint is None:
        raise RuntimeError(f"training run '{run_name}' finished without a checkpoint")
    return TrainOutcome(Path(result.checkpoint.path), _dedupe_epochs(history), str(result.path))


def _dedupe_epochs(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """After a worker-group restart, epochs after the checkpoint are reported again: keep the
    last report of each epoch."""
    by_epoch = {int(m["epoch"]): m for m in history}
    return [by_epoch[e] for e in sorted(by_epoch)]
