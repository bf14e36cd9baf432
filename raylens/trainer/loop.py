"""The training loop: plain PyTorch, no Ray, no MLflow.

It takes a model (already wrapped by a parallel strategy, or not), tensors of the worker's rows,
an optimizer and a ``Reporter``. Everything distributed or tracked happens behind the reporter
and the strategy, so this loop runs the same in a unit test, a Tune trial and a DDP worker.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raylens.trainer.config import OptimizerConfig
from raylens.trainer.metrics import metrics_from_summary, summarize


@dataclass(frozen=True)
class TaskSpec:
    """What the model's output means, and the loss it is trained with.

    Classification: cross-entropy of the logits, each row weighing its class's ``class_weights``
    entry (empty: every row weighs 1), averaged over the rows' weights as
    ``F.cross_entropy(weight=...)`` does. Regression targets are trained standardized
    (``(y - target_mean) / target_std``) so one learning rate suits any target scale; predictions
    are turned back into the target's units, and so is every loss reported (``train_loss``,
    ``valid_loss``, ``test_loss``): the mean squared error in the target's units squared, the
    standardized loss times ``target_std²`` (``loss_scale``).
    """

    kind: Literal["classification", "regression"]
    num_classes: int = 0
    target_mean: float = 0.0
    target_std: float = 1.0
    class_weights: tuple[float, ...] = ()
    """One weight per class, in the order of the feature set's classes; empty: unweighted."""

    def __post_init__(self) -> None:
        # A model's spec stores the weights as a JSON list: keep the spec hashable once loaded.
        object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        if self.class_weights and len(self.class_weights) != self.num_classes:
            raise ValueError(f"{len(self.class_weights)} class weights for {self.num_classes} classes")

    @property
    def out_features(self) -> int:
        return self.num_classes if self.kind == "classification" else 1

    @property
    def loss_scale(self) -> float:
        """Turns the loss the model is trained on into the loss reported (target units for regression)."""
        return self.target_std**2 if self.kind == "regression" else 1.0


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


def loss_fn(output: torch.Tensor, y: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """The loss the model is trained on: weighted cross-entropy, or the MSE of the standardized
    target (see ``TaskSpec``)."""
    if task.kind == "classification":
        return F.cross_entropy(output, y, weight=_class_weights(task, output.dtype, output.device))
    return F.mse_loss(output.squeeze(-1), (y - task.target_mean) / task.target_std)


def _rows_weight(y: torch.Tensor, task: TaskSpec) -> torch.Tensor | int:
    """What ``loss_fn`` averages over for these rows: their class weights' sum, or their count."""
    weight = _class_weights(task, torch.float64, y.device) if task.kind == "classification" else None
    return weight[y].sum() if weight is not None else len(y)


@functools.lru_cache(maxsize=16)
def _class_weights(task: TaskSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The weight tensor ``F.cross_entropy`` takes, made once per task and device, not per step."""
    return torch.tensor(task.class_weights, dtype=dtype, device=device) if task.class_weights else None


Combine = Callable[[np.ndarray], np.ndarray]
"""Sums a vector across the workers of a run (an all-reduce); the identity on one worker."""


def local(values: np.ndarray) -> np.ndarray:
    return values


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
) -> None:
    """Train from ``start_epoch`` to ``epochs``; after every epoch, validate and report.

    Every caller that trains in lockstep (DDP ranks) must pass the same number of rows, so each
    runs the same number of steps. ``combine`` makes the reported train loss the loss over all
    workers' rows.
    """
    for epoch in range(start_epoch, epochs):
        model.train()
        # Seeded per epoch, so a run resumed at epoch k shuffles exactly as the uninterrupted one.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64)
        weight_sum = torch.zeros((), dtype=torch.float64)
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            x, y = train.x[index], train.y[index]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y, task)
            loss.backward()
            optimizer.step()
            # The step's loss is a mean over its rows' weights: summed back, the epoch's loss is
            # the weighted mean over all its rows (the plain mean when unweighted).
            rows_weight = _rows_weight(y, task)
            rows_weight = rows_weight.cpu() if isinstance(rows_weight, torch.Tensor) else rows_weight
            loss_sum += loss.detach().cpu() * rows_weight
            weight_sum += rows_weight
        elapsed = time.perf_counter() - started
        total_loss, total_weight, rows = combine(
            np.array([float(loss_sum), float(weight_sum), float(len(order))])
        )
        metrics = {
            "epoch": float(epoch + 1),
            "train_loss": float(total_loss / total_weight * task.loss_scale) if total_weight > 0 else 0.0,
            "train_samples_per_s": float(rows / elapsed) if elapsed > 0 else 0.0,
        }
        metrics.update({f"valid_{k}": v for k, v in validate().items()})
        reporter.report(metrics, TrainState(model, optimizer, epoch + 1))


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int) -> torch.Tensor:
    model.eval()
    chunks = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, task.out_features)


def _decode(outputs: torch.Tensor, task: TaskSpec) -> np.ndarray:
    """Class indices for classification, values in the target's units for regression."""
    if task.kind == "classification":
        return outputs.argmax(dim=-1).cpu().numpy()
    return (outputs.squeeze(-1) * task.target_std + task.target_mean).cpu().numpy()


def predict(model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int = 4096) -> np.ndarray:
    """Class indices for classification, values in the target's units for regression."""
    return _decode(_outputs(model, x, task, batch_size), task)


def predict_proba(model: nn.Module, x: torch.Tensor, task: TaskSpec, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities, one column per class in the order of the feature set's classes: the
    softmax of the logits, computed in float64 so each row sums to 1 to within 1e-12."""
    if task.kind != "classification":
        raise ValueError("class probabilities need a classification task")
    outputs = _outputs(model, x, task, batch_size)
    return torch.softmax(outputs.to(torch.float64), dim=-1).cpu().numpy()


def evaluate(
    model: nn.Module, data: Batches, task: TaskSpec, *, combine: Combine = local, batch_size: int = 4096
) -> dict[str, float]:
    """Loss and the task's metrics on ``data``; with ``combine``, on the rows of all workers
    (each passing its share). Empty when there are no rows."""
    outputs = _outputs(model, data.x, task, batch_size)
    loss_weight = float(_rows_weight(data.y, task))
    with torch.no_grad():
        loss_sum = float(loss_fn(outputs, data.y, task)) * loss_weight * task.loss_scale if len(data) else 0.0
    summary = summarize(
        data.y.cpu().numpy(),
        _decode(outputs, task),
        loss_sum,
        task.kind,
        task.num_classes,
        task.target_mean,
        loss_weight=loss_weight,
    )
    return metrics_from_summary(combine(summary), task.kind, task.num_classes)
