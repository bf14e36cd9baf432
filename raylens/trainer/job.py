"""One training job, the same wherever it runs: a Tune trial's process or a Ray Train worker.

Terms: a *worker* is one training process (a rank); a *job* is what every worker of one run
trains (model, hyperparameters, task). ``run_worker`` builds the model, applies the parallel
strategy, restores a checkpoint if there is one, and hands the worker's rows to the plain loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raylens.features import FeatureSet, SplitArrays
from raylens.trainer.config import ModelConfig, TrainConfig
from raylens.trainer.loop import Batches, FitResult, Monitor, Reporter, evaluate, fit, local, make_optimizer
from raylens.trainer.models import build_model
from raylens.trainer.parallel import ParallelPlan, all_reduce_sum, restore
from raylens.trainer.task import TaskSpec, task_spec


@dataclass(frozen=True)
class TrainJob:
    model: ModelConfig
    train: TrainConfig
    task: TaskSpec
    in_features: int

    @classmethod
    def for_feature_set(cls, model: ModelConfig, train: TrainConfig, feature_set: FeatureSet) -> TrainJob:
        task = task_spec(feature_set, train.class_weights)
        return cls(model, train, task, len(feature_set.feature_columns))


def shard_rows(num_rows: int, rank: int, world_size: int, seed: int) -> np.ndarray:
    """This rank's rows: a seeded permutation dealt round-robin, trimmed so every rank gets the
    same count (DDP ranks must take the same number of steps or the all-reduce hangs)."""
    if world_size == 1:
        return np.arange(num_rows)
    order = np.random.default_rng(seed).permutation(num_rows)
    per_rank = num_rows // world_size
    return np.sort(order[rank::world_size][:per_rank])


def run_worker(
    job: TrainJob,
    train: SplitArrays,
    valid: SplitArrays,
    reporter: Reporter,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    resume_from: dict[str, Any] | None = None,
    monitors: Sequence[Monitor] = (),
) -> FitResult:
    """Train ``job`` on this worker's share of ``train``; every rank of a run calls it."""
    device = device or torch.device("cpu")
    torch.manual_seed(job.train.seed)  # every rank starts from the same weights
    model = build_model(job.model, job.in_features, job.task.out_features)
    plan = ParallelPlan.from_config(job.train.scaling.strategy, world_size, device.type)
    parallel = plan.apply(model, device)
    if world_size > 1:
        # Same weights everywhere, then each rank its own stream: dropout masks differ per rank,
        # as if the rows of one large batch were drawn independently.
        torch.manual_seed(job.train.seed + rank)
    optimizer = make_optimizer(parallel.module, job.train.optimizer)
    start_epoch = (
        restore(parallel.module, optimizer, resume_from, rank=rank, world_size=world_size)
        if resume_from
        else 0
    )
    rows = shard_rows(len(train), rank, world_size, job.train.seed)
    combine = all_reduce_sum if world_size > 1 else local
    valid_rows = parallel.validation_rows(len(valid), rank, world_size)
    valid_combine = combine if parallel.shards_validation else local
    valid_batches = Batches.from_numpy(valid.x[valid_rows], valid.y[valid_rows]).to(device)
    return fit(
        parallel.module,
        optimizer,
        Batches.from_numpy(train.x[rows], train.y[rows]).to(device),
        job.task,
        epochs=job.train.epochs,
        batch_size=job.train.batch_size,
        seed=job.train.seed + rank,
        reporter=reporter,
        validate=lambda: evaluate(parallel.eval_module, valid_batches, job.task, combine=valid_combine),
        combine=combine,
        start_epoch=start_epoch,
        monitors=monitors,
    )
