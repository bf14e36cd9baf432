"""One training job, the same wherever it runs: a Tune trial's process or a Ray Train worker.

Terms: a *worker* is one training process (a rank); a *job* is what every worker of one run
trains (model, hyperparameters, task). ``run_worker`` builds the model, applies the parallel
strategy, restores a checkpoint if there is one, and hands the worker's rows to the plain loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raylens.errors import UserError
from raylens.features import SplitArrays
from raylens.trainer.config import TorchModelConfig, TrainConfig
from raylens.trainer.debug.debugger import Debugger
from raylens.trainer.debug.rules import Finding
from raylens.trainer.family import TrainingFailed, TrainJob
from raylens.trainer.loop import (
    Action,
    Batches,
    FitResult,
    Heartbeat,
    Heartbeats,
    Monitor,
    Reporter,
    ShuffleRows,
    StepRules,
    StreamedBatches,
    TrainState,
    evaluate,
    fit,
    local,
    make_optimizer,
)
from raylens.trainer.models import build_model
from raylens.trainer.monitors import EarlyStopping, FiniteLoss
from raylens.trainer.parallel import Parallelized, ParallelPlan, all_reduce_sum, restore, resume_position
from raylens.trainer.parallel.checkpoint import ATTACHMENTS
from raylens.trainer.parallel.collectives import collective_device
from raylens.trainer.parallel.plan import worker_memory
from raylens.trainer.schedules import learning_rate


def shard_rows(num_rows: int, rank: int, world_size: int, seed: int, epoch: int = 0) -> np.ndarray:
    """This rank's rows for ``epoch``, in the order it visits them: a permutation seeded by the
    run's seed and the epoch, dealt round-robin and trimmed so every rank gets the same count
    (DDP ranks must take the same number of steps or the all-reduce hangs). Drawn anew each
    epoch, so over the run each rank sees every row, as one process would."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    per_rank = num_rows // world_size
    return order[rank::world_size][:per_rank]


def _epoch_rows(
    parallel: Parallelized, rows: int, rank: int, world_size: int, seed: int, batch_size: int
) -> tuple[ShuffleRows, int]:
    """The rows each epoch visits on this rank, and how many: its share under data parallelism,
    all of them otherwise (one worker, a pipeline's stages); whole batches only if the strategy
    asks."""
    dealt = parallel.splits_data and world_size > 1
    share, shares = (rank, world_size) if dealt else (0, 1)
    count = rows // shares
    if parallel.whole_batches:
        count -= count % batch_size
    return lambda epoch: torch.from_numpy(shard_rows(rows, share, shares, seed, epoch)[:count]), count


class _WorkerReporter:
    """Tells the reporter whether the state it saves is sharded across ranks, and hands it the
    files the checkpoint keeps beside the state (the debugger's; gathering them is a collective,
    made on every rank)."""

    def __init__(
        self, reporter: Reporter, sharded: bool, attachments: Callable[[], dict[str, bytes]] = dict
    ) -> None:
        self.reporter, self.sharded, self.attachments = reporter, sharded, attachments

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        self.reporter.report(metrics, replace(state, sharded=self.sharded, attachments=self.attachments()))


def raise_if_failed(result: FitResult) -> FitResult:
    """``result``, or ``TrainingFailed`` when a monitor failed the run."""
    if result.stopped is not None and result.stopped.action is Action.FAIL:
        raise TrainingFailed(result.stopped.reason)
    return result


def _gather(world_size: int) -> Callable[[Any], list[Any]]:
    if world_size == 1:
        return lambda value: [value]

    def gather(value: Any) -> list[Any]:
        every: list[Any] = [None] * world_size
        dist.all_gather_object(every, value)
        return every

    return gather


def _smallest(value: int, world_size: int) -> int:
    if world_size == 1:
        return value
    least = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return int(least.item())


def step_rules(train: TrainConfig, rows: int) -> StepRules:
    """What ``train`` asks of each optimizer step, for a worker visiting ``rows`` rows per epoch."""
    batches = -(-rows // train.batch_size)
    steps_per_epoch = -(-batches // train.accumulate_batches)
    schedule = train.schedule
    scheduled = schedule.name != "constant" or schedule.warmup_epochs > 0
    return StepRules(
        accumulate=train.accumulate_batches,
        clip_grad_norm=train.clip_grad_norm,
        autocast=torch.bfloat16 if train.precision == "bf16" else None,
        rate=learning_rate(schedule, train.optimizer.lr, train.epochs, steps_per_epoch)
        if scheduled
        else None,
        evaluate_every=train.eval_every_steps,
    )


@dataclass(frozen=True)
class StreamedSplit:
    """A training split read as a stream (``train.data: ray_data``): this worker's batches, its
    first rows (to build and place the model) and every row's target (a number per row: the
    class counts the debugger judges)."""

    batches: StreamedBatches
    head: np.ndarray
    y: np.ndarray


def run_worker(
    job: TrainJob,
    train: SplitArrays | StreamedSplit,
    valid: SplitArrays,
    reporter: Reporter,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    resume_from: dict[str, Any] | None = None,
    monitors: Sequence[Monitor] = (),
    heartbeat: Heartbeat | None = None,
    on_finding: Callable[[Finding], None] | None = None,
) -> FitResult:
    """Train ``job`` on this worker's share of ``train``; every rank of a run calls it.
    ``on_finding``: hears the debugger's findings whose action is not ``record`` (default: a
    warning in the log)."""
    started = time.perf_counter()  # the debugger times the start, up to the first step
    device = device or torch.device("cpu")
    torch.manual_seed(job.train.seed)  # every rank starts from the same weights
    assert isinstance(job.model, TorchModelConfig), "run_worker trains torch models"
    model = build_model(job.model, job.in_features, job.task.out_features)
    plan = ParallelPlan.from_config(
        job.train.scaling.strategy,
        world_size,
        device.type,
        parameters=sum(p.numel() for p in model.parameters()),
        # Every rank must choose alike: each decides from the smallest worker's memory.
        worker_memory=_smallest(worker_memory(device, world_size), world_size),
        pipeline=job.train.scaling.pipeline,
    )
    batch_size = job.train.batch_size
    if plan.strategy == "pipeline" and len(train.y) < batch_size:  # (a stream never is a pipeline's)
        raise UserError(
            f"the training split has {len(train.y)} rows, fewer than one batch (train.batch_size "
            f"{batch_size}), and a pipeline trains whole batches only: lower train.batch_size"
        )
    head = train.head if isinstance(train, StreamedSplit) else train.x
    parallel = plan.apply(model, device, batch=torch.from_numpy(np.array(head[:batch_size])), task=job.task)
    if world_size > 1:
        # Same weights everywhere, then each rank its own stream: dropout masks differ per rank,
        # as if the rows of one large batch were drawn independently.
        torch.manual_seed(job.train.seed + rank)
    optimizer = make_optimizer(parallel.module, job.train.optimizer)
    start_epoch, start_step, so_far = 0, None, None
    if resume_from:
        start_epoch = restore(parallel.module, optimizer, resume_from, rank=rank, world_size=world_size)
        start_step, so_far = resume_position(resume_from)
        # The optimizer's values are the job's, not the checkpoint's: the same on a resume, new
        # where a scheduler (PBT) goes on from another trial's checkpoint with perturbed values.
        for group in optimizer.param_groups:
            group.update(lr=job.train.optimizer.lr, weight_decay=job.train.optimizer.weight_decay)
    combine = all_reduce_sum if world_size > 1 else local
    valid_rows = parallel.validation_rows(len(valid), rank, world_size)
    sums_validation = (
        parallel.shards_validation if parallel.sums_validation is None else parallel.sums_validation
    )
    valid_combine = combine if sums_validation else local
    valid_batches = Batches.from_numpy(valid.x[valid_rows], valid.y[valid_rows]).to(device)
    train_batches: Batches | StreamedBatches
    epoch_rows: ShuffleRows | None
    if isinstance(train, StreamedSplit):  # already this worker's share, shuffled as it streams
        train_batches, epoch_rows, rows_per_epoch = train.batches, None, len(train.batches)
    else:
        train_batches = Batches.from_numpy(train.x, train.y).to(device)
        epoch_rows, rows_per_epoch = _epoch_rows(
            parallel, len(train), rank, world_size, job.train.seed, batch_size
        )
    debugger = None
    if job.train.debug is not None:
        debugger = Debugger(
            job.train.debug,
            parallel.module,
            optimizer,
            rank=rank,
            on_finding=on_finding,
            gather=_gather(world_size),
            started=started,
        )
        if resume_from:
            debugger.resume(resume_from.get(ATTACHMENTS, {}))
        else:
            counts = None
            if job.task.kind == "classification":
                labels, rows = np.unique(train.y, return_counts=True)
                counts = {str(int(k)): int(c) for k, c in zip(labels, rows, strict=True)}
            verdict = debugger.judge_start(counts)
            if verdict.action is not Action.CONTINUE:
                # Nothing is trained yet, nothing to keep: a stop here ends the run as a failure.
                return FitResult(start_epoch, replace(verdict, action=Action.FAIL), 0)
    monitors = [*monitors, *([debugger] if debugger is not None else []), FiniteLoss()]
    if job.train.early_stopping is not None:
        monitors.append(EarlyStopping(job.train.early_stopping))
    return fit(
        parallel.module,
        optimizer,
        train_batches,
        job.task,
        epochs=job.train.epochs,
        batch_size=batch_size,
        seed=job.train.seed + rank,
        reporter=_WorkerReporter(
            reporter, parallel.sharded_checkpoint, debugger.files if debugger is not None else dict
        ),
        validate=lambda: evaluate(
            parallel.eval_module, valid_batches, job.task, combine=valid_combine, forward=parallel.forward
        ),
        combine=combine,
        start_epoch=start_epoch,
        monitors=monitors,
        rules=step_rules(job.train, rows_per_epoch),
        epoch_rows=epoch_rows,
        train_step=parallel.train_step,
        clip_grad_norm=parallel.clip_grad_norm,
        heartbeat=Heartbeats(heartbeat, debugger) if debugger is not None else heartbeat,
        start_step=start_step,
        so_far=so_far if rank == 0 else None,  # sums over every rank: added once
    )
