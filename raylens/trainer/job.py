"""One training job, the same wherever it runs: a Tune trial's process or a Ray Train worker.

Terms: a *worker* is one training process (a rank); a *job* is what every worker of one run
trains (model, hyperparameters, task). ``run_worker`` builds the model, applies the parallel
strategy, restores a checkpoint if there is one, and hands the worker's rows to the plain loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from raylens.errors import UserError, did_you_mean
from raylens.features import FeatureSet, SplitArrays
from raylens.trainer.config import ClassWeights, ModelConfig, TrainConfig
from raylens.trainer.loop import Batches, Reporter, TaskSpec, evaluate, fit, local, make_optimizer
from raylens.trainer.models import build_model
from raylens.trainer.parallel import all_reduce_sum, parallelize, resolve_strategy, restore


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


def task_spec(feature_set: FeatureSet, class_weights: ClassWeights = None) -> TaskSpec:
    """The task of ``feature_set``, with ``class_weights`` (``train.class_weights``) resolved
    against its classes and, for "balanced", its training split's labels."""
    if feature_set.task == "classification":
        labels = feature_set.read("train").y if class_weights == "balanced" else np.empty(0, np.int64)
        weights = resolve_class_weights(class_weights, feature_set.classes, labels)
        return TaskSpec("classification", num_classes=feature_set.num_outputs, class_weights=weights)
    resolve_class_weights(class_weights, None, np.empty(0))  # refuses weights for a regression
    stats = feature_set.manifest.get("target_statistics", {})
    return TaskSpec("regression", target_mean=stats.get("mean", 0.0), target_std=stats.get("std", 1.0) or 1.0)


def resolve_class_weights(
    config: ClassWeights, classes: Sequence[Any] | None, train_labels: np.ndarray
) -> tuple[float, ...]:
    """One weight per class of ``classes`` (``None``: a regression) from ``train.class_weights``;
    empty when unweighted. "balanced": ``rows / (classes x rows of the class)`` over
    ``train_labels`` (class indices of the training split), scikit-learn's ``"balanced"``; a class
    with no training rows weighs 1. A mapping: keys matched to ``str(label)``, unlisted classes 1.
    Raises ``UserError`` for weights on a regression and for a label that is not a class."""
    if config is None:
        return ()
    if classes is None:
        raise UserError(
            "train.class_weights: class weights apply to classification, and this feature set's task "
            "is regression; remove train.class_weights"
        )
    if config == "balanced":
        counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=len(classes))
        balanced = len(train_labels) / (len(classes) * np.maximum(counts, 1))
        return tuple(float(w) for w in np.where(counts > 0, balanced, 1.0))
    labels = [str(label) for label in classes]
    unknown = [key for key in config if key not in labels]
    if unknown:
        shown = ", ".join(repr(label) for label in labels[:20]) + (", ..." if len(labels) > 20 else "")
        raise UserError(
            f"train.class_weights: {unknown[0]!r} is not a class of this feature set"
            f"{did_you_mean(unknown[0], labels)}; its classes are {shown}"
        )
    return tuple(float(config.get(label, 1.0)) for label in labels)


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
) -> None:
    """Train ``job`` on this worker's share of ``train``; every rank of a run calls it."""
    device = device or torch.device("cpu")
    torch.manual_seed(job.train.seed)  # every rank starts from the same weights
    model = build_model(job.model, job.in_features, job.task.out_features)
    strategy = resolve_strategy(job.train.scaling.strategy, world_size)
    model = parallelize(model, strategy, device)
    if world_size > 1:
        # Same weights everywhere, then each rank its own stream: dropout masks differ per rank,
        # as if the rows of one large batch were drawn independently.
        torch.manual_seed(job.train.seed + rank)
    optimizer = make_optimizer(model, job.train.optimizer)
    start_epoch = (
        restore(model, optimizer, resume_from, rank=rank, world_size=world_size) if resume_from else 0
    )
    rows = shard_rows(len(train), rank, world_size, job.train.seed)
    combine = all_reduce_sum if world_size > 1 else local
    eval_model: nn.Module = model
    valid_rows, valid_combine = np.arange(len(valid)), local
    if strategy == "ddp":
        # Replicas are identical: each rank scores its share of the validation rows with the bare
        # module (no collectives in its forward) and the metric sums are all-reduced. (FSDP's
        # forward is itself collective, so there every rank scores every row, in step.)
        eval_model = cast(nn.Module, model.module)
        valid_rows, valid_combine = np.array_split(valid_rows, world_size)[rank], combine
    valid_batches = Batches.from_numpy(valid.x[valid_rows], valid.y[valid_rows]).to(device)
    fit(
        model,
        optimizer,
        Batches.from_numpy(train.x[rows], train.y[rows]).to(device),
        job.task,
        epochs=job.train.epochs,
        batch_size=job.train.batch_size,
        seed=job.train.seed + rank,
        reporter=reporter,
        validate=lambda: evaluate(eval_model, valid_batches, job.task, combine=valid_combine),
        combine=combine,
        start_epoch=start_epoch,
    )
