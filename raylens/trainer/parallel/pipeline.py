"""Pipeline model parallelism (``torch.distributed.pipelining``): the model is cut into one stage
per worker at split points, and each batch flows through the stages as microbatches (GPipe or
1F1B schedule).

The cut is traced (``pipeline(..., split_spec)``), so any module whose forward ``torch.export``
can trace is pipelined from outside, its code untouched; each stage keeps the model's parameter
names (``net.4.weight``), so a stage's checkpoint shard is a slice of the whole model's state.
All stages see the same batch (one replica, split by depth): stage 0 feeds the inputs, the last
stage computes the loss. A traced stage has fixed activation shapes, so an epoch trains whole
batches only. Validation runs the stages in turn (activations sent with their shape, any batch
size), the last stage scoring and the sums combined across ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raylens.trainer.config import PipelineConfig
from raylens.trainer.outputs import loss_fn
from raylens.trainer.parallel.plan import Parallelized
from raylens.trainer.task import TaskSpec


class PipelineError(ValueError):
    """A model that cannot be cut into the stages asked for."""


def split_points(model: nn.Module, stages: int, requested: Sequence[str] | None = None) -> list[str]:
    """The ``stages - 1`` module names where stages begin: chosen among ``requested`` (or the
    model's ``pipeline_split_points``) so the stages hold about as many parameters each."""
    declared = getattr(model, "pipeline_split_points", None)
    candidates = list(requested if requested is not None else declared or [])
    name = type(model).__name__
    if requested is None and not candidates:
        raise PipelineError(
            f"{name} declares no pipeline split points: name the modules where stages begin in "
            "train.scaling.pipeline.split_points (see model.named_modules()), or give the model "
            "an attribute pipeline_split_points"
        )
    positions = {module_name: i for i, (module_name, _) in enumerate(model.named_modules())}
    unknown = [c for c in candidates if c not in positions or c == ""]
    if unknown:
        raise PipelineError(
            f"split point(s) {', '.join(map(repr, unknown))} name no module of {name}; its modules "
            f"are: {', '.join(n for n in positions if n)}"
        )
    candidates = sorted(set(candidates), key=positions.__getitem__)
    if len(candidates) < stages - 1:
        raise PipelineError(
            f"{stages} pipeline stages need {stages - 1} split point(s), and {name} has "
            f"{len(candidates)} ({', '.join(candidates) or 'none'}): use at most "
            f"{len(candidates) + 1} workers, or name more in train.scaling.pipeline.split_points"
        )
    return _balanced(model, candidates, stages)


def _balanced(model: nn.Module, candidates: list[str], stages: int) -> list[str]:
    """Greedily, for each stage boundary, the candidate whose preceding parameter count is
    nearest the even share, leaving enough candidates for the boundaries after it."""
    before: dict[str, int] = {}
    seen = 0
    for module_name, module in model.named_modules():
        before.setdefault(module_name, seen)
        seen += sum(p.numel() for p in module.parameters(recurse=False))
    total = max(seen, 1)
    chosen: list[str] = []
    start = 0
    for boundary in range(1, stages):
        left = stages - 1 - boundary  # boundaries still to place after this one
        options = range(start, len(candidates) - left)
        best = min(options, key=lambda i: abs(before[candidates[i]] - boundary * total / stages))
        chosen.append(candidates[best])
        start = best + 1
    return chosen


def _send(tensor: torch.Tensor, to: int) -> None:
    """A tensor and, first, its shape (validation batches vary in size); on the tensor's device
    (NCCL sends CUDA tensors only)."""
    shape = torch.tensor([tensor.dim(), *tensor.shape], dtype=torch.int64, device=tensor.device)
    dist.send(torch.tensor([shape.numel()], dtype=torch.int64, device=tensor.device), to)
    dist.send(shape, to)
    dist.send(tensor.contiguous(), to)


def _receive(source: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    length = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(length, source)
    shape = torch.zeros(int(length.item()), dtype=torch.int64, device=device)
    dist.recv(shape, source)
    tensor = torch.empty(tuple(shape[1:].tolist()), dtype=dtype, device=device)
    dist.recv(tensor, source)
    return tensor


class _StageForward:
    """Validation's forward through the stages: every rank is called with the same rows; a stage
    before the last passes its activations on and returns None, the last returns the outputs."""

    def __init__(self, stage: nn.Module, rank: int, stages: int, device: torch.device) -> None:
        self.stage, self.rank, self.stages, self.device = stage, rank, stages, device

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        inputs = x if self.rank == 0 else _receive(self.rank - 1, x.dtype, self.device)
        outputs = self.stage(inputs)
        if self.rank < self.stages - 1:
            _send(outputs, self.rank + 1)
            return None
        return outputs


class _ScheduleStep:
    """One batch through the pipeline schedule (forward and backward of every microbatch)."""

    def __init__(self, schedule: object, rank: int, stages: int, microbatches: int, task: TaskSpec) -> None:
        self.schedule, self.rank, self.stages, self.microbatches = schedule, rank, stages, microbatches
        self.task = task
        self.scale = 1.0

    def loss(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # The schedule backpropagates each microbatch's loss: divided by their count (and the
        # accumulation's scale), the gradients add up to the whole batch's mean loss's.
        return loss_fn(outputs, target, self.task) * (self.scale / self.microbatches)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, scale: float, sync: bool) -> torch.Tensor | None:
        self.scale = scale
        first, last = self.rank == 0, self.rank == self.stages - 1
        losses: list[torch.Tensor] = []
        arguments = (x,) if first else ()
        self.schedule.step(*arguments, target=y if last else None, losses=losses if last else None)  # type: ignore[attr-defined]
        if not last:
            return None
        # Each is a microbatch's loss x scale / microbatches: their sum / scale is the mean.
        return torch.stack([loss.detach() for loss in losses]).sum() / scale


class ClipAcross:
    """Gradient clipping by the whole model's norm: each stage's squared norm, summed over the
    stages, then every stage scaled by the same factor."""

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.parameters = parameters

    def __call__(self, limit: float) -> torch.Tensor:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        device = self.parameters[0].device
        local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
        squared = (local.float() ** 2).reshape(1)
        dist.all_reduce(squared)
        total = squared.sqrt()[0]
        torch.nn.utils.clip_grads_with_norm_(self.parameters, limit, total)
        return total


def _traced(model: nn.Module, microbatch: torch.Tensor, points: list[str], stages: int) -> Any:
    from torch.distributed.pipelining import SplitPoint, pipeline

    with warnings.catch_warnings():
        # torch.export's own deprecation notices while tracing: not the user's to act on.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            pipe = pipeline(
                model, mb_args=(microbatch,), split_spec=dict.fromkeys(points, SplitPoint.BEGINNING)
            )
        except Exception as exc:  # torch.export's errors on a forward it cannot trace
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            raise PipelineError(
                f"{type(model).__name__} cannot be traced into pipeline stages ({type(exc).__name__}: "
                f"{reason}); keep its forward free of data-dependent Python control flow, or use ddp or fsdp"
            ) from None
    if pipe.num_stages != stages:
        raise PipelineError(
            f"cutting {type(model).__name__} at {', '.join(points)} gave {pipe.num_stages} stages, "
            f"not {stages}: choose split points on the path of its forward"
        )
    return pipe


def check_cut(model: nn.Module, rows: torch.Tensor, stages: int, config: PipelineConfig) -> list[str]:
    """The split points ``model`` would be cut at, the cut traced on ``rows`` (a microbatch):
    ``PipelineError`` for any reason it would fail in the workers. No process group needed."""
    points = split_points(model, stages, config.split_points)
    _traced(model, rows, points, stages)
    return points


def apply(
    model: nn.Module,
    device: torch.device,
    *,
    config: PipelineConfig,
    batch: torch.Tensor,
    task: TaskSpec,
) -> Parallelized:
    """This rank's stage of ``model``, cut for ``dist.get_world_size()`` stages; ``batch`` is one
    full batch of inputs (its microbatches' shape is the one the stages are traced with)."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    rank, stages = dist.get_rank(), dist.get_world_size()
    points = split_points(model, stages, config.split_points)
    microbatch = batch[: len(batch) // config.microbatches].to(device)
    pipe = _traced(model.to(device), microbatch, points, stages)
    stage = pipe.build_stage(rank, device)
    schedule_type = Schedule1F1B if config.schedule == "1f1b" else ScheduleGPipe
    step = _ScheduleStep(None, rank, stages, config.microbatches, task)
    # scale_grads=False: the loss is divided by the microbatches instead (``_ScheduleStep.loss``),
    # which keeps gradients accumulated over several batches at their weight.
    step.schedule = schedule_type(stage, config.microbatches, loss_fn=step.loss, scale_grads=False)
    module = stage.submod
    return Parallelized(
        module,
        module,
        shards_validation=False,
        sums_validation=True,
        forward=_StageForward(module, rank, stages, device),
        train_step=step,
        clip_grad_norm=ClipAcross([p for p in module.parameters() if p.requires_grad]),
        splits_data=False,
        whole_batches=True,
        sharded_checkpoint=True,
    )
