"""The parallel plan: which strategy a run's workers apply, checked, and why it was chosen.

``ParallelPlan.from_config(requested, world_size, device)`` is a value, like torchtitan's
``ParallelDims``: it validates the combination once (in the driver, before anything starts) and
carries the reason for its choice, which the run records. ``plan.apply(model, device)`` wraps a
model from outside and returns what the loop needs (``Parallelized``); the model's code never
changes. Inside a Ray Train worker the process group already exists (gloo on CPU, NCCL on GPU);
the strategies only use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from raylens.trainer.config import PipelineConfig
from raylens.trainer.loop import ClipGradNorm, Forward, TrainStep

if TYPE_CHECKING:
    from raylens.trainer.task import TaskSpec

Strategy = Literal["none", "ddp", "fsdp", "pipeline"]

STATE_BYTES_PER_PARAMETER = 16
"""What training holds per parameter: float32 weights, gradients and Adam's two moments."""
REPLICA_SHARE = 0.5
"""The share of a worker's memory a replica's training state may take (activations and data
need the rest) before ``auto`` shards instead of replicating."""


def worker_memory(device: torch.device, workers_on_node: int) -> int:
    """Bytes one worker may use: its GPU's memory, or this machine's RAM shared by its workers."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram // max(1, workers_on_node))


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def one_process_reason(workers: int, cpus: float, parameters: int, memory: int) -> str | None:
    """Why ``auto`` trains with one process holding all ``cpus`` rather than ``workers``
    replicas on one machine of ``memory`` bytes, or None when a replica would not fit there
    (then the workers shard the model). On CPUs sharing one machine, one process with every core
    trains faster than replicas that all-reduce gradients over gloo after every step
    (``bench trainer``: 1 worker x 2 CPUs beats DDP x 2 of 1 CPU)."""
    state = parameters * STATE_BYTES_PER_PARAMETER
    if workers < 2 or state > REPLICA_SHARE * memory:
        return None
    return (
        f"auto → 1 worker with {cpus:g} CPUs instead of {workers}: they would share this one "
        f"machine, where one process using every core outpaces replicas averaging gradients each "
        f"step (training state {_size(state)}, {_size(memory)} of memory)"
    )


@dataclass(frozen=True)
class Parallelized:
    """What a strategy gives the loop."""

    module: nn.Module
    """The module the loop trains (the strategy's wrapper around the model)."""
    eval_module: nn.Module
    """The module validation scores rows with."""
    shards_validation: bool
    """True: each rank scores its share of the validation rows with ``eval_module`` (its forward
    holds no collective) and the metric sums are combined across ranks; False: every rank scores
    every row, in step (the forward itself is collective)."""
    sums_validation: bool | None = None
    """Whether the ranks' validation sums are added up (None: as ``shards_validation``; a
    pipeline's last stage alone holds them)."""
    forward: Forward | None = None
    """Validation's forward (None: ``eval_module``)."""
    train_step: TrainStep | None = None
    """The strategy's own forward and backward of a batch (None: the loop's)."""
    clip_grad_norm: ClipGradNorm | None = None
    """The strategy's own gradient clipping (None: ``clip_grad_norm_`` of ``module``)."""
    splits_data: bool = True
    """True: each rank trains on its share of the rows (data parallel); False: every rank sees
    the same batches (a pipeline's stages)."""
    whole_batches: bool = False
    """Train on whole batches only (a traced pipeline's shapes are fixed)."""
    sharded_checkpoint: bool = False
    """Each rank saves its own shard of the state (torch.distributed.checkpoint), rather than
    rank 0 the whole of it."""

    def validation_rows(self, rows: int, rank: int, world_size: int) -> np.ndarray:
        """The validation rows this rank scores."""
        everything = np.arange(rows)
        return np.array_split(everything, world_size)[rank] if self.shards_validation else everything


@dataclass(frozen=True)
class ParallelPlan:
    """A run's strategy for ``world_size`` workers on ``device`` ("cpu" or "cuda"), and why."""

    strategy: Strategy
    world_size: int
    device: str
    reason: str
    """Said in the terminal and recorded with the run (``raylens.parallel`` tag)."""
    pipeline: PipelineConfig | None = None
    """strategy pipeline: its schedule, microbatches and split points."""

    @classmethod
    def from_config(
        cls,
        requested: str,
        world_size: int,
        device: str = "cpu",
        *,
        parameters: int | None = None,
        worker_memory: int | None = None,
        pipeline: PipelineConfig | None = None,
    ) -> ParallelPlan:
        """The plan for ``train.scaling.strategy`` = ``requested``; ``ValueError`` for a
        combination no worker could run (the spec's validation refuses it first, with its key).

        ``auto`` decides from the model's ``parameters`` and each worker's memory (bytes): DDP
        while a replica's training state takes at most ``REPLICA_SHARE`` of it, else FSDP."""
        if world_size < 1:
            raise ValueError(f"a run needs at least one worker, got {world_size}")
        if requested not in ("auto", "ddp", "fsdp", "pipeline"):
            raise ValueError(f"strategy {requested!r} is not one of auto, ddp, fsdp, pipeline")
        if world_size == 1:
            # Also for fsdp: a reference run of one process trains what the ranks would, and
            # the spec refuses fsdp with one worker before a plan is made.
            return cls("none", 1, device, "1 worker: the model is trained as it is, no parallel wrapper")
        if requested == "pipeline":
            config = pipeline or PipelineConfig()
            reason = (
                f"pipeline (requested): the model cut into {world_size} stages, one per worker; "
                f"{config.schedule} schedule, {config.microbatches} microbatches per batch"
            )
            return cls("pipeline", world_size, device, reason, config)
        if requested == "fsdp":
            reason = f"fsdp (requested): parameters, gradients and optimizer state sharded over {world_size}"
            return cls("fsdp", world_size, device, reason)
        if requested == "ddp":
            return cls(
                "ddp", world_size, device, f"ddp (requested): {world_size} replicas, gradients averaged"
            )
        if parameters is None or worker_memory is None:
            return cls("ddp", world_size, device, f"auto → ddp: {world_size} replicas, gradients averaged")
        state = parameters * STATE_BYTES_PER_PARAMETER
        sizes = f"training state {_size(state)} per replica, {_size(worker_memory)} per worker"
        if state > REPLICA_SHARE * worker_memory:
            return cls(
                "fsdp",
                world_size,
                device,
                f"auto → fsdp: a replica would not fit ({sizes}); sharded over {world_size}",
            )
        return cls(
            "ddp",
            world_size,
            device,
            f"auto → ddp: {world_size} replicas, gradients averaged ({sizes}: replicas fit, and are fastest)",
        )

    def apply(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        batch: torch.Tensor | None = None,
        task: TaskSpec | None = None,
    ) -> Parallelized:
        """``model`` wrapped by this plan's strategy, on ``device``. A pipeline also needs one
        full ``batch`` of inputs (the stages are traced with its microbatches) and the ``task``
        (its last stage computes the loss)."""
        # Imported here: each strategy's module imports this one (and FSDP's import is heavy).
        from raylens.trainer.parallel import ddp, fsdp, pipeline, single

        if self.strategy == "pipeline":
            if batch is None or task is None:
                raise ValueError("a pipeline is traced with a batch of inputs and needs the task")
            return pipeline.apply(
                model, device, config=self.pipeline or PipelineConfig(), batch=batch, task=task
            )
        strategies = {"none": single.apply, "ddp": ddp.apply, "fsdp": fsdp.apply}
        return strategies[self.strategy](model, device)
