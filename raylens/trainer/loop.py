"""The training loop: plain PyTorch, no Ray, no MLflow.

It takes a model (already wrapped by a parallel strategy, or not), tensors of the worker's rows,
an optimizer and a ``Reporter``. Everything distributed or tracked happens behind the reporter
and the strategy, so this loop runs the same in a unit test, a Tune trial and a DDP worker.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from raylens.trainer.config import OptimizerConfig
from raylens.trainer.decisions import Action, Decision
from raylens.trainer.metrics import metrics_from_summary, summarize
from raylens.trainer.outputs import decode, loss_fn, loss_weight, probabilities
from raylens.trainer.schedules import Rate
from raylens.trainer.task import TaskSpec


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


class StreamedBatches(Protocol):
    """Training rows that are not held but stream (Ray Data): each epoch's batches in turn,
    already this worker's share and shuffled, as (features, targets) tensors on ``device``."""

    device: torch.device

    def __len__(self) -> int:
        """Rows this worker trains on per epoch."""
        ...

    def epoch(self, epoch: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class EpochSoFar:
    """The sums of an epoch interrupted by a mid-epoch checkpoint, over all ranks: a run resumed
    there reports the epoch's train loss over all its batches, as the uninterrupted one does."""

    loss_sum: float
    weight_sum: float
    norm_sum: float
    norms: int

    def as_list(self) -> list[float]:
        return [self.loss_sum, self.weight_sum, self.norm_sum, float(self.norms)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> EpochSoFar:
        return cls(float(values[0]), float(values[1]), float(values[2]), int(values[3]))


@dataclass
class TrainState:
    """What a checkpoint holds: the model and optimizer after ``epoch`` completed epochs (and,
    saved mid-epoch, ``step`` optimizer steps of the run and the epoch's sums so far)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int
    sharded: bool = False
    """Each rank holds a shard of the state (FSDP, a pipeline's stage) and saves its own."""
    step: int | None = None
    """Saved mid-epoch: optimizer steps of the run so far (None: at the end of ``epoch``)."""
    so_far: EpochSoFar | None = None
    """Saved mid-epoch: the unfinished epoch's sums."""
    attachments: Mapping[str, bytes] = field(default_factory=dict)
    """Files kept with the checkpoint, by path within it (the debugger's capture and findings)."""


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


@dataclass(frozen=True)
class StepView:
    """What a monitor sees after an optimizer step."""

    epoch: int
    """The epoch being trained (0-based)."""
    step: int
    """Optimizer steps of the run so far, resumed epochs included."""
    loss: torch.Tensor | None
    """This step's loss, detached; reading its value waits for the device (monitors choose when).
    None on a pipeline stage before the last (the last one holds the loss)."""
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
    evaluate_every: int | None = None
    """Also validate, report and checkpoint every this many optimizer steps within an epoch;
    every report then carries ``step``."""


ShuffleRows = Callable[[int], torch.Tensor]
"""The rows (indices into the worker's ``train``) an epoch visits, in order."""


class TrainStep(Protocol):
    """Forward and backward of one batch (gradients added to ``.grad``, no optimizer step): the
    model's, or a strategy's own (a pipeline's schedule). Returns the batch's loss, detached, or
    None on a rank that computes no loss (a pipeline stage before the last)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, scale: float, sync: bool) -> torch.Tensor | None:
        """``scale``: the factor on the loss's gradient (1 / accumulated batches); ``sync``:
        False on a batch whose gradients accumulate locally before the step's (DDP skips its
        all-reduce there)."""
        ...


class ForwardBackward:
    """The plain train step: ``loss_fn(model(x), y).backward()``; ``backward_started`` is called
    between the two (a stall watch tells a rank stuck in forward from one waiting in backward)."""

    def __init__(
        self, model: nn.Module, task: TaskSpec, backward_started: Callable[[], None] | None = None
    ) -> None:
        self.model, self.task, self.backward_started = model, task, backward_started
        self.no_sync = getattr(model, "no_sync", None)  # DDP

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, scale: float, sync: bool) -> torch.Tensor:
        with self.no_sync() if self.no_sync is not None and not sync else contextlib.nullcontext():
            loss = loss_fn(self.model(x), y, self.task)
            if self.backward_started is not None:
                self.backward_started()
            (loss * scale if scale != 1 else loss).backward()
        return loss.detach()


class Heartbeat(Protocol):
    """Hears the loop's progress (``raylens.trainer.watchdog.StallWatch``)."""

    def beat(self, epoch: int, step: int, phase: int) -> None:
        """The loop moved on to ``phase`` (``raylens.trainer.watchdog.PHASES``: 0 loading the
        batch, 1 forward, 2 backward, 3 optimizer step) of the step after ``step`` steps."""
        ...

    def pause(self) -> None:
        """Validation and reporting follow."""
        ...


class Heartbeats:
    """Several listeners to the loop's progress, heard in order."""

    def __init__(self, *beats: Heartbeat | None) -> None:
        self.beats = [b for b in beats if b is not None]

    def beat(self, epoch: int, step: int, phase: int) -> None:
        for heartbeat in self.beats:
            heartbeat.beat(epoch, step, phase)

    def pause(self) -> None:
        for heartbeat in self.beats:
            heartbeat.pause()


ClipGradNorm = Callable[[float], torch.Tensor]
"""Clips the gradients' total norm to the value given; returns the norm before clipping."""


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Batches | StreamedBatches,
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
    train_step: TrainStep | None = None,
    clip_grad_norm: ClipGradNorm | None = None,
    heartbeat: Heartbeat | None = None,
    start_step: int | None = None,
    so_far: EpochSoFar | None = None,
) -> FitResult:
    """Train from ``start_epoch`` to ``epochs``; after every epoch, validate and report.

    Each epoch visits ``epoch_rows(epoch)`` (default: every row of ``train``, shuffled by
    ``seed`` and the epoch). Every caller that trains in lockstep (DDP ranks) must visit the same
    number of rows, so each runs the same number of steps. ``combine`` makes the reported train
    loss the loss over all workers' rows, and agrees the ``monitors``' decisions. A stop decided
    after a step ends the run there (the unfinished epoch is not reported); one decided after an
    epoch, once that epoch is reported. Without monitors nothing runs between steps.

    ``train_step`` and ``clip_grad_norm`` are the strategy's (default: the model's forward and
    backward, and ``clip_grad_norm_`` of its parameters). Rows count where the loss is computed.
    ``heartbeat`` hears each finished batch, and a pause before each validation.

    Resumed from a mid-epoch checkpoint, ``start_step`` (the steps it holds) is past
    ``start_epoch``'s first steps: their batches are skipped, and the epoch's sums start from
    ``so_far`` (given to one rank only: they are the sums over all ranks).
    """
    streamed = not isinstance(train, Batches)
    if streamed and (epoch_rows is not None or start_step is not None):
        raise ValueError("streamed rows come dealt and shuffled, and resume at epoch ends only")
    shuffle = epoch_rows or _shuffled(len(train), seed)
    rows_per_epoch = len(train) if streamed else len(shuffle(start_epoch))
    batches_per_epoch = -(-rows_per_epoch // batch_size)
    device = train.x.device if isinstance(train, Batches) else train.device
    steps_per_epoch = -(-batches_per_epoch // rules.accumulate)
    step = start_epoch * steps_per_epoch if start_step is None else start_step
    skip = (step - start_epoch * steps_per_epoch) * rules.accumulate
    where = {"epoch": start_epoch, "step": step}  # for the heartbeat's phases inside the step
    backward_started = None
    if heartbeat is not None:
        beat = heartbeat.beat
        backward_started = lambda: beat(where["epoch"], where["step"], 2)  # noqa: E731
    forward_backward = train_step or ForwardBackward(model, task, backward_started)
    clip = clip_grad_norm or (lambda limit: torch.nn.utils.clip_grad_norm_(model.parameters(), limit))
    scale = 1 / rules.accumulate
    for epoch in range(start_epoch, epochs):
        model.train()
        stream = None if isinstance(train, Batches) else train.epoch(epoch, batch_size)
        order = shuffle(epoch) if stream is None else None
        started = time.perf_counter()
        earlier = so_far if epoch == start_epoch and so_far is not None else EpochSoFar(0.0, 0.0, 0.0, 0)
        # Summed where the losses are: on a GPU, reading one back would wait for the device on
        # every batch; the sums are read once, at the epoch's end.
        loss_sum = torch.tensor(earlier.loss_sum, dtype=torch.float64, device=device)
        weight_sum = torch.tensor(earlier.weight_sum, dtype=torch.float64, device=device)
        rows = 0
        norms: list[torch.Tensor] = []
        for position in range(batches_per_epoch):
            if epoch == start_epoch and position < skip:
                continue  # trained before the mid-epoch checkpoint this run resumed from
            if heartbeat is not None:
                where["epoch"], where["step"] = epoch, step
                heartbeat.beat(epoch, step, 0)
            if stream is not None:
                x, y = _next_batch(stream, position, batches_per_epoch)
            else:
                assert order is not None and isinstance(train, Batches)
                index = order[position * batch_size : (position + 1) * batch_size]
                x, y = train.x[index], train.y[index]
            if heartbeat is not None:
                heartbeat.beat(epoch, step, 1)
            steps_now = (position + 1) % rules.accumulate == 0 or position == batches_per_epoch - 1
            with torch.autocast(
                x.device.type, dtype=rules.autocast or torch.bfloat16, enabled=rules.autocast is not None
            ):
                loss = forward_backward(x, y, scale=scale, sync=steps_now)
            if heartbeat is not None:
                heartbeat.beat(epoch, step, 3)
            if loss is not None:
                # The batch's loss is a mean over its rows' weights: summed back, the epoch's loss
                # is the weighted mean over all its rows (the plain mean when unweighted).
                rows_weight = loss_weight(y, task)
                loss_sum += loss.double() * rows_weight
                weight_sum += rows_weight
                rows += len(y)
            if not steps_now:
                continue
            if rules.clip_grad_norm is not None:
                norms.append(_local(clip(rules.clip_grad_norm)).detach())
            if rules.rate is not None:
                for group in optimizer.param_groups:
                    group["lr"] = rules.rate(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if monitors:
                due = [m for m in monitors if m.every and step % m.every == 0]
                if due:
                    view = StepView(epoch, step, loss, model, optimizer)
                    stop = _agreed([m.on_step(view) for m in due], combine)
                    if stop is not None:
                        return FitResult(epoch, stop, step)
            last_batch = position == batches_per_epoch - 1
            if rules.evaluate_every and step % rules.evaluate_every == 0 and not last_batch:
                if heartbeat is not None:
                    heartbeat.pause()
                sums = combine(np.array([float(loss_sum), float(weight_sum)]))
                # Norms are the same on every rank (of the whole model's gradients): this rank's.
                norm_sum, count = _norms(earlier, norms)
                state = EpochSoFar(float(sums[0]), float(sums[1]), norm_sum, count)
                metrics = {"epoch": epoch + (position + 1) / batches_per_epoch, "step": float(step)}
                metrics.update({f"valid_{k}": v for k, v in validate().items()})
                reporter.report(metrics, TrainState(model, optimizer, epoch, step=step, so_far=state))
                model.train()
        if stream is not None and next(stream, None) is not None:  # ends the epoch's stream, too
            raise RuntimeError(
                f"the training stream held more than its {batches_per_epoch} batches this epoch; every "
                "worker must train as many batches as the others"
            )
        elapsed = time.perf_counter() - started
        if heartbeat is not None:
            heartbeat.pause()
        total_loss, total_weight, total_rows = combine(
            np.array([float(loss_sum), float(weight_sum), float(rows)])
        )
        metrics = {
            "epoch": float(epoch + 1),
            "train_loss": float(total_loss / total_weight * task.loss_scale) if total_weight > 0 else 0.0,
            "train_samples_per_s": float(total_rows / elapsed) if elapsed > 0 else 0.0,
        }
        if rules.evaluate_every:
            metrics["step"] = float(step)
        norm_sum, count = _norms(earlier, norms)
        if count:
            metrics["train_grad_norm"] = norm_sum / count
        if rules.rate is not None:
            metrics["train_lr"] = float(optimizer.param_groups[0]["lr"])
        metrics.update({f"valid_{k}": v for k, v in validate().items()})
        reporter.report(metrics, TrainState(model, optimizer, epoch + 1))
        if monitors:
            stop = _agreed([m.on_epoch(metrics) for m in monitors], combine)
            if stop is not None:
                return FitResult(epoch + 1, stop, step)
    return FitResult(epochs)


def _next_batch(
    stream: Iterator[tuple[torch.Tensor, torch.Tensor]], position: int, batches: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream's next batch; a stream that ends early would leave this worker behind the
    others in a collective, so it is an error that says so."""
    try:
        return next(stream)
    except StopIteration:
        raise RuntimeError(
            f"the training stream ended after {position} of its {batches} batches this epoch; every "
            "worker must train as many batches as the others"
        ) from None


def _norms(earlier: EpochSoFar, norms: list[torch.Tensor]) -> tuple[float, int]:
    """The epoch's gradient norms so far: their sum and count."""
    return earlier.norm_sum + (
        float(torch.stack(norms).double().sum()) if norms else 0.0
    ), earlier.norms + len(norms)


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


Forward = Callable[[torch.Tensor], "torch.Tensor | None"]
"""A model's outputs for a batch, or None on a rank that does not hold them (a pipeline stage
before the last: it passes its activations on)."""


@torch.no_grad()
def _outputs(
    model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int, forward: Forward | None = None
) -> torch.Tensor | None:
    model.eval()
    chunks = [(forward or model)(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    whole = [chunk for chunk in chunks if chunk is not None]
    if len(whole) < len(chunks):
        return None
    return torch.cat(whole) if whole else torch.empty(0, task.out_features)


def _whole_outputs(model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int) -> torch.Tensor:
    outputs = _outputs(model, x, task, batch_size)
    assert outputs is not None  # a whole model always returns its outputs
    return outputs


def predict(model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int = 4096) -> np.ndarray:
    """Class indices for classification, values in the target's units for regression."""
    return decode(_whole_outputs(model, x, task, batch_size), task)


def predict_proba(model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities, one column per class in the order of the feature set's classes."""
    return probabilities(_whole_outputs(model, x, task, batch_size), task)


def evaluate(
    model: nn.Module,
    data: Batches,
    task: TaskSpec,
    *,
    combine: Combine = local,
    batch_size: int = 4096,
    forward: Forward | None = None,
) -> dict[str, float]:
    """Loss and the task's metrics on ``data``; with ``combine``, on the rows of all workers
    (each passing its share). Empty when there are no rows. ``forward``: how outputs are computed
    (default: ``model``); where it returns None this rank adds nothing to the sums (a pipeline
    stage before the last: the last one's sums, combined, are the result)."""
    outputs = _outputs(model, data.x, task, batch_size, forward)
    if outputs is None:
        data = Batches(data.x[:0], data.y[:0])
        outputs = torch.empty(0, task.out_features)
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
