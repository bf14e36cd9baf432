"""A task's outputs in torch: the loss a model is trained on, and its outputs decoded into
predictions and class probabilities (see ``TaskSpec`` for what they mean).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from raylens.trainer.task import TaskSpec


def loss_fn(output: torch.Tensor, y: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """The loss the model is trained on: weighted cross-entropy, or the MSE of the standardized
    target (see ``TaskSpec``)."""
    if task.kind == "classification":
        return F.cross_entropy(output, y, weight=_class_weights(task, output.dtype, output.device))
    return F.mse_loss(output.squeeze(-1), (y - task.target_mean) / task.target_std)


def loss_weight(y: torch.Tensor, task: TaskSpec) -> torch.Tensor | int:
    """What ``loss_fn`` averages over for these rows: their class weights' sum, or their count."""
    weight = _class_weights(task, torch.float64, y.device) if task.kind == "classification" else None
    return weight[y].sum() if weight is not None else len(y)


@functools.lru_cache(maxsize=16)
def _class_weights(task: TaskSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The weight tensor ``F.cross_entropy`` takes, made once per task and device, not per step."""
    return torch.tensor(task.class_weights, dtype=dtype, device=device) if task.class_weights else None


def decode(outputs: torch.Tensor, task: TaskSpec) -> np.ndarray:
    """Class indices for classification, values in the target's units for regression."""
    if task.kind == "classification":
        return outputs.argmax(dim=-1).cpu().numpy()
    return (outputs.squeeze(-1) * task.target_std + task.target_mean).cpu().numpy()


def probabilities(outputs: torch.Tensor, task: TaskSpec) -> np.ndarray:
    """Class probabilities from a classifier's logits, one column per class: the softmax,
    computed in float64 so each row sums to 1 to within 1e-12."""
    if task.kind != "classification":
        raise ValueError("class probabilities need a classification task")
    return torch.softmax(outputs.to(torch.float64), dim=-1).cpu().numpy()
