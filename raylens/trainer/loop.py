"""The training loop: plain PyTorch, no Ray, no MLflow.

It takes a model (already wrapped by a parallel strategy, or not), tensors of the worker's rows,
an optimizer and a ``Reporter``. Everything distributed or tracked happens behind the reporter
and the strategy, so this loop runs the same in a unit test, a Tune trial and a DDP worker.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
import torch
from torch import nn

from raylens.trainer.config import OptimizerConfig
from raylens.trainer.metrics import metrics_from_summary, summarize
from raylens.trainer.schedules import Rate
from raylens.trainer.task import TaskSpec, decode, loss_fn, loss_weight, probabilities


@dataclass(frozen=True)
class Batches:
    """Rows held as two tensors; batches are gathered by index, never collated row by row."""

    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def from_numpy(cls, x: np.ndarray, y: np.ndarray) -> Batches:
        """Zero-copy views. Shared arrays (Arrow, the object store) are read-only; the loop only
        reads its inputs, so PyTorch's warning about non-writable arrays does not apply."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return cls(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> Batches:
        return Batches(self.x.to(device), self.y.to(device))


@dataclass
class TrainState:
    """What a checkpoint holds: the model and optimizer after ``epoch`` completed epochs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int


class Reporter(Protocol):
    """Receives each epoch's metrics and state; it decides what to persist and where."""

    def report(self, metrics: dict[str, float], state: TrainState) -> None: ...


def make_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


Combine = Callable[[np.ndarray], np.ndarray]
"""Sums a vector across the workers of a run (an all-reduce); the identity on one worker."""


def local(values: np.ndarray) -> np.ndarray:
    return values


class Action(StrEnum):
    CONTINUE = "continue"
    STOP = "stop"
    """End the run as finished (early stopping)."""
    FAIL = "fail"
    """End the run as failed, the reason its error (a diverged loss)."""


@dataclass(frozen=True)
class Decision:
    """What a monitor decided, and why (said to the user when it stops a run)."""

    action: Action = Action.CONTINUE
    reason: str = ""


GO_ON = Decision()


@dataclass(frozen=True)
class StepView:
    """What a monitor sees after an optimizer step."""

    epoch: int
    """The epoch being trained (0-based)."""
    step: int
    """Optimizer steps of the run so far, resumed epochs included."""
    loss: torch.Tensor
    """This step's loss, detached; reading its value waits for the device (monitors choose when)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer


class Monitor(Protocol):
    """Watches the run: after every ``every``-th step and after every epoch's validation it may
    decide to stop it. Decisions are agreed across ranks (any rank's stop stops all), on the same
    steps everywhere, so no rank waits in a collective the others left: every rank of a run is
    given monitors with the same ``every`` (what they decide may differ)."""

    every: int
    """Steps between two ``on_step`` calls; 0: after epochs only."""

    def on_step(self, view: StepView) -> Decision: ...
    def on_epoch(self, metrics: dict[str, float]) -> Decision: ...


@dataclass(frozen=True)
class FitResult:
    """How ``fit`` ended: the epochs completed, and the decision that stopped it early, if any."""

    epochs: int
    stopped: Decision | None = None
    stopped_at_step: int | None = None


@dataclass(frozen=True)
class StepRules:
    """How each optimizer step is taken, beyond forward, backward and step (all off by default)."""

    accumulate: int = 1
    """Batches whose gradients add up before one optimizer step."""
    clip_grad_norm: float | None = None
    """Clip the gradients' total norm to this; the epoch's mean norm before clipping is reported."""
    autocast: torch.dtype | None = None
    """Run forward and loss under ``torch.autocast`` with this dtype (bfloat16)."""
    rate: Rate | None = None
    """The learning rate of each optimizer step (``raylens.trainer.schedules``); None: as set."""


ShuffleRows = Callable[[int], torch.Tensor]
"""The rows (indices into the worker's ``train``) an epoch visits, in order."""


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Batches,
    task: TaskSpec,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    reporter: Reporter,
    validate: Callable[[], dict[str, float]] = dict,
    combine: Combine = local,
    start_epoch: int = 0,
    monitors: Sequence[Monitor] = (),
    rules: StepRules = StepRules(),
    epoch_rows: ShuffleRows | None = None,
) -> FitResult:
    """Train from ``start_epoch`` to ``epochs``; after every epoch, validate and report.

    Each epoch visits ``epoch_rows(epoch)`` (default: every row of ``train``, shuffled by
    ``seed`` and the epoch). Every caller that trains in lockstep (DDP ranks) must visit the same
    number of rows, so each runs the same number of steps. ``combine`` makes the reported train
    loss the loss over all workers' rows, and agrees the ``monitors``' decisions. A stop decided
    after a step ends the run there (the unfinished epoch is not reported); one decided after an
    epoch, once that epoch is reported. Without monitors nothing runs between steps.
    """
    shuffle = epoch_rows or _shuffled(len(train), seed)
    batches_per_epoch = -(-len(shuffle(start_epoch)) // batch_size)
    steps_per_epoch = -(-batches_per_epoch // rules.accumulate)
    step = start_epoch * steps_per_epoch
    no_sync = getattr(model, "no_sync", None)  # DDP: no all-reduce on the batches that accumulate
    for epoch in range(start_epoch, epochs):
        model.train()
        order = shuffle(epoch)
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        weight_sum = torch.zeros((), dtype=torch.float64)
        norms: list[torch.Tensor] = []
        batch_starts = range(0, len(order), batch_size)
        for position, begin in enumerate(batch_starts):
            index = order[begin : begin + batch_size]
            x, y = train.x[index], train.y[index]
            steps_now = (position + 1) % rules.accumulate == 0 or position == len(batch_starts) - 1
            with (
                no_sync() if no_sync is not None and not steps_now else contextlib.nullcontext(),
                torch.autocast(
                    x.device.type, dtype=rules.autocast or torch.bfloat16, enabled=rules.autocast is not None
                ),
            ):
                loss = loss_fn(model(x), y, task)
                (loss / rules.accumulate if rules.accumulate > 1 else loss).backward()
            # The batch's loss is a mean over its rows' weights: summed back, the epoch's loss is
            # the weighted mean over all its rows (the plain mean when unweighted).
            rows_weight = loss_weight(y, task)
            rows_weight = rows_weight.cpu() if isinstance(rows_weight, torch.Tensor) else rows_weight
            loss_sum += loss.detach().float().cpu() * rows_weight
            weight_sum += rows_weight
            if not steps_now:
                continue
            if rules.clip_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), rules.clip_grad_norm)
                norms.append(_local(norm).detach())
            if rules.rate is not None:
                for group in optimizer.param_groups:
                    group["lr"] = rules.rate(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if monitors:
                due = [m for m in monitors if m.every and step % m.every == 0]
                if due:
                    view = StepView(epoch, step, loss.detach(), model, optimizer)
                    stop = _agreed([m.on_step(view) for m in due], combine)
                    if stop is not None:
                        return FitResult(epoch, stop, step)
        elapsed = time.perf_counter() - started
        total_loss, total_weight, rows = combine(
            np.array([float(loss_sum), float(weight_sum), float(len(order))])
        )
        metrics = {
            "epoch": float(epoch + 1),
            "train_loss": float(total_loss / total_weight * task.loss_scale) if total_weight > 0 else 0.0,
            "train_samples_per_s": float(rows / elapsed) if elapsed > 0 else 0.0,
        }
        if norms:
            metrics["train_grad_norm"] = float(torch.stack(norms).float().mean())
        if rules.rate is not None:
            metrics["train_lr"] = float(optimizer.param_groups[0]["lr"])
        metrics.update({f"valid_{k}": v for k, v in validate().items()})
        reporter.report(metrics, TrainState(model, optimizer, epoch + 1))
        if monitors:
            stop = _agreed([m.on_epoch(metrics) for m in monitors], combine)
            if stop is not None:
                return FitResult(epoch + 1, stop, step)
    return FitResult(epochs)


def _shuffled(rows: int, seed: int) -> ShuffleRows:
    """Every row, in an order seeded per epoch: a run resumed at epoch k shuffles exactly as the
    uninterrupted one."""
    return lambda epoch: torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _local(norm: torch.Tensor) -> torch.Tensor:
    """A sharded model's norm comes back as a DTensor: the whole norm is its full tensor."""
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm


def _agreed(decisions: Sequence[Decision], combine: Combine) -> Decision | None:
    """This rank's stop or fail decision, or another rank's: every rank gets the same action
    (one all-reduce of two flags), a failure winning over a stop. Another rank's reason is not
    sent; it is said where it was decided."""
    fail = next((d for d in decisions if d.action is Action.FAIL), None)
    stop = next((d for d in decisions if d.action is Action.STOP), None)
    stops, fails = combine(np.array([1.0 if stop else 0.0, 1.0 if fail else 0.0]))
    if fails:
        return fail or Decision(Action.FAIL, "another worker failed the run")
    if stops:
        return stop or Decision(Action.STOP, "another worker stopped the run")
    return None


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int) -> torch.Tensor:
    model.eval()
    chunks = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, task.out_features)


def predict(model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int = 4096) -> np.ndarray:
    """Class indices for classification, values in the target's units for regression."""
    return decode(_outputs(model, x, task, batch_size), task)


def predict_proba(model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities, one column per class in the order of the feature set's classes."""
    return probabilities(_outputs(model, x, task, batch_size), task)


def evaluate(
    model: nn.Module, data: Batches, task: TaskSpec, *, combine: Combine = local, batch_size: int = 4096
) -> dict[str, float]:
    """Loss and the task's metrics on ``data``; with ``combine``, on the rows of all workers
    (each passing its share). Empty when there are no rows."""
    outputs = _outputs(model, data.x, task, batch_size)
    weight = float(loss_weight(data.y, task))
    with torch.no_grad():
        loss_sum = float(loss_fn(outputs, data.y, task)) * weight * task.loss_scale if len(data) else 0.0
    summary = summarize(
        data.y.cpu().numpy(),
        decode(outputs, task),
        loss_sum,
        task.kind,
        task.num_classes,
        task.target_mean,
        loss_weight=weight,
    )
    return metrics_from_summary(combine(summary), task.kind, task.num_classes)
