"""The task: what a model's outputs mean and the loss it is trained with (its torch side, the
loss and the decoding of outputs, is ``raylens.trainer.outputs``). No torch here: a scikit-learn
trial reads the task without importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from raylens.errors import UserError, did_you_mean
from raylens.features import FeatureSet
from raylens.trainer.config import ClassWeights


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


def task_spec(feature_set: FeatureSet, class_weights: ClassWeights = None) -> TaskSpec:
    """The task of ``feature_set``, with ``class_weights`` (``train.class_weights``) resolved
    against its classes and, for "balanced", its training split's labels."""
    if feature_set.task == "classification":
        labels = feature_set.read("train").y if class_weights == "balanced" else np.empty(0, np.int64)
        weights = resolve_class_weights(class_weights, feature_set.classes, labels)
        return TaskSpec("classification", num_classes=feature_set.num_outputs, class_weights=weights)
    resolve_class_weights(class_weights, None, np.empty(0))  # refuses weights for a regression
    stats = feature_set.manifest.target_statistics
    if stats is None:
        return TaskSpec("regression")
    return TaskSpec("regression", target_mean=stats.mean, target_std=stats.std or 1.0)


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
