"""Metrics of a model's predictions: per-epoch validation metrics, and the test metrics of a run.

Validation metrics are computed with NumPy from an additive summary (below), so ranks can each
score a share of the rows. Classification: loss, accuracy, macro F1 and the confusion matrix
(rows: true class, columns: predicted class), and for a binary task the precision and recall of
the positive class. Regression: loss, RMSE, MAE and R². Each matches scikit-learn's definition of
the same name (``tests/trainer/test_metrics.py`` checks it).

Test metrics that need class probabilities (ROC-AUC, average precision, log loss) and per-class
scores are scikit-learn's own, computed once on the driver (``classification_test_metrics``).

The *positive class* of a binary task is the second of the feature set's classes, which are
sorted (``[0, 1]``: 1; ``[False, True]``: True; ``["benign", "malignant"]``: "malignant").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from raylens.trainer.family import Predictor
    from raylens.trainer.task import TaskSpec

POSITIVE = 1
"""Index of the positive class of a binary task: the second of the sorted classes."""


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return matrix


def f1_macro(matrix: np.ndarray) -> float:
    """Macro F1 over the classes that occur in the truth or the predictions (as scikit-learn does);
    a class with no true and no predicted rows would be 0/0 and is left out, and 0/0 precision or
    recall counts as 0."""
    true_pos = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    present = (predicted + actual) > 0
    denom = predicted + actual
    f1 = np.divide(2 * true_pos, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def positive_class_scores(matrix: np.ndarray) -> dict[str, float]:
    """Precision and recall of the positive class from a binary confusion matrix; 0/0 counts as 0
    (scikit-learn's ``zero_division=0``)."""
    true_pos = float(matrix[POSITIVE, POSITIVE])
    predicted, actual = float(matrix[:, POSITIVE].sum()), float(matrix[POSITIVE, :].sum())
    return {
        "precision": true_pos / predicted if predicted else 0.0,
        "recall": true_pos / actual if actual else 0.0,
    }


def summarize(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    loss_sum: float,
    kind: str,
    num_classes: int,
    shift: float = 0.0,
    *,
    loss_weight: float | None = None,
) -> np.ndarray:
    """Additive statistics of a set of predictions: summaries of shards add up to the summary of
    the whole, so ranks can score their share of rows and all-reduce one vector.

    The loss is ``loss_sum / loss_weight``: ``loss_weight`` is what the loss averages over, the
    rows' class weights when they are weighted (``F.cross_entropy(weight=...)``), else the rows.

    Regression sums the target as ``y - shift``: R² needs the target's squared deviations, and
    from raw sums (sum y², (sum y)²) they cancel catastrophically when the target sits far from
    zero (y = 1e6 + noise gave R² = 0.0 for -3.58). Every shard must use the same shift; one near
    the target's mean (the training mean) keeps the sums small and exact enough."""
    rows = float(len(y_true))
    head = [loss_sum, rows if loss_weight is None else loss_weight, rows]
    if kind == "classification":
        return np.concatenate([head, confusion_matrix(y_true, y_pred, num_classes).ravel()]).astype(
            np.float64
        )
    y, error = y_true.astype(np.float64) - shift, y_pred.astype(np.float64) - y_true.astype(np.float64)
    return np.array(
        [*head, np.sum(error**2), np.sum(np.abs(error)), np.sum(y), np.sum(y**2)], dtype=np.float64
    )


def metrics_from_summary(summary: np.ndarray, kind: str, num_classes: int) -> dict[str, float]:
    loss_sum, loss_weight, n = (float(v) for v in summary[:3])
    if n == 0:
        return {}
    metrics = {"loss": loss_sum / loss_weight}
    if kind == "classification":
        matrix = summary[3:].reshape(num_classes, num_classes)
        metrics["accuracy"] = float(np.trace(matrix) / n)
        metrics["f1_macro"] = f1_macro(matrix)
        if num_classes == 2:
            metrics.update(positive_class_scores(matrix))
        return metrics
    sq_error, abs_error, sum_y, sum_y2 = (float(v) for v in summary[3:7])
    ss_tot = sum_y2 - sum_y**2 / n
    if ss_tot > 1e-12 * max(sum_y2, 1.0):
        r2 = 1.0 - sq_error / ss_tot
    else:  # scikit-learn's force_finite convention for a constant target
        r2 = 1.0 if sq_error == 0 else 0.0
    metrics.update({"rmse": float(np.sqrt(sq_error / n)), "mae": abs_error / n, "r2": r2})
    return metrics


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro F1 of class indices."""
    summary = summarize(y_true, y_pred, 0.0, "classification", num_classes)
    metrics = metrics_from_summary(summary, "classification", num_classes)
    metrics.pop("loss", None)
    return metrics


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R² of values in the target's units."""
    shift = float(np.mean(y_true)) if len(y_true) else 0.0
    metrics = metrics_from_summary(summarize(y_true, y_pred, 0.0, "regression", 0, shift), "regression", 0)
    metrics.pop("loss", None)
    return metrics


def classification_test_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[Any]
) -> tuple[dict[str, float], dict[str, float]]:
    """scikit-learn's scores of class probabilities (rows: the test rows, columns: ``classes``), as
    ``(overall, per_class)``. Binary: ROC-AUC, average precision (``pr_auc``), precision, recall
    and F1 of the positive class and the log loss, and no per-class scores. More classes: the log
    loss overall, precision and recall per class (``precision_<label>``, see ``metric_labels``).

    The log loss is not weighted by class weights. A metric a test set cannot define is left out,
    as a fact of the data, not an error: ROC-AUC needs both classes among the rows, average
    precision a positive row. Predicted classes are the most probable ones (as ``predict``)."""
    from sklearn import metrics as sk  # imported here: the model's loader imports this module

    indices = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    overall = {"log_loss": float(sk.log_loss(y_true, probabilities, labels=indices))}
    precision, recall, f1, _ = sk.precision_recall_fscore_support(
        y_true, y_pred, labels=indices, average=None, zero_division=0
    )
    if len(classes) == 2:
        positive = y_true == POSITIVE
        if positive.any() and not positive.all():
            overall["roc_auc"] = float(sk.roc_auc_score(positive, probabilities[:, POSITIVE]))
        if positive.any():
            overall["pr_auc"] = float(sk.average_precision_score(positive, probabilities[:, POSITIVE]))
        overall.update(
            precision=float(precision[POSITIVE]), recall=float(recall[POSITIVE]), f1=float(f1[POSITIVE])
        )
        return overall, {}
    per_class: dict[str, float] = {}
    for i, label in enumerate(metric_labels(classes)):
        per_class[f"precision_{label}"] = float(precision[i])
        per_class[f"recall_{label}"] = float(recall[i])
    return overall, per_class


def predicted_metrics(predictor: Predictor, x: np.ndarray, y: np.ndarray, task: TaskSpec) -> dict[str, float]:
    """Loss and the task's metrics of ``predictor`` on rows ``x`` with targets ``y``, named and
    defined as the loop's validation reports them, whatever the family: the loss is the
    class-weighted cross-entropy of the predicted probabilities, or the mean squared error in
    the target's units. Empty when there are no rows."""
    if not len(y):
        return {}
    if task.kind == "classification":
        probabilities = predictor.predict_proba(x)
        predicted = probabilities.argmax(axis=1)
        weights = np.asarray(task.class_weights, dtype=np.float64)[y] if task.class_weights else None
        # Clipped as scikit-learn's log_loss clips: a hard 0 (a forest's vote) costs -log(eps), not inf.
        picked = np.clip(probabilities[np.arange(len(y)), y.astype(np.int64)], np.finfo(np.float64).eps, None)
        losses = -np.log(picked)
        loss_sum = float(np.sum(losses * weights) if weights is not None else np.sum(losses))
        weight = float(weights.sum()) if weights is not None else None
        summary = summarize(y, predicted, loss_sum, task.kind, task.num_classes, loss_weight=weight)
    else:
        predicted = predictor.predict(x)
        loss_sum = float(np.sum((predicted.astype(np.float64) - y.astype(np.float64)) ** 2))
        summary = summarize(y, predicted, loss_sum, task.kind, 0, task.target_mean)
    return metrics_from_summary(summary, task.kind, task.num_classes)


@dataclass(frozen=True)
class SplitScores:
    """A model's metrics on the test split, named as the run logs them (``test_...``)."""

    overall: dict[str, float]
    """Loss and metrics of the whole split: the run's, and the registered version's tags."""
    per_class: dict[str, float]
    """Precision and recall of each class (more than two classes only): the run's."""
    confusion: np.ndarray | None
    """The confusion matrix (classification with test rows)."""


def score_test_split(
    predictor: Predictor, x: np.ndarray, y: np.ndarray, task: TaskSpec, classes: Sequence[Any] | None
) -> SplitScores:
    """``predicted_metrics`` on the test rows, and for classification scikit-learn's scores of the
    class probabilities (``classification_test_metrics``) and the confusion matrix."""
    overall = {f"test_{k}": v for k, v in predicted_metrics(predictor, x, y, task).items()}
    if task.kind != "classification" or not len(y):
        return SplitScores(overall, {}, None)
    probabilities = predictor.predict_proba(x)
    scored, per_class = classification_test_metrics(y, probabilities, classes or [])
    overall.update({f"test_{k}": v for k, v in scored.items()})
    matrix = confusion_matrix(y, probabilities.argmax(axis=1), task.num_classes)
    return SplitScores(overall, {f"test_{k}": v for k, v in per_class.items()}, matrix)


def metric_labels(classes: Sequence[Any]) -> list[str]:
    """Each class as it appears in a metric name: ``str(label)`` with every character other than
    ASCII letters, digits, ``_``, ``-`` and ``.`` replaced by ``_`` (what MLflow accepts on every
    platform). Two labels that would read the same get their class index appended."""
    names = [re.sub(r"[^A-Za-z0-9_.-]", "_", str(label)) for label in classes]
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


VALIDATION_METRICS = {
    "classification": ("loss", "accuracy", "f1_macro"),
    "regression": ("loss", "rmse", "mae", "r2"),
}
BINARY_VALIDATION_METRICS = ("precision", "recall")
"""Reported besides the classification metrics when there are two classes (of the positive class)."""
TRAIN_METRICS = ("epoch", "train_loss", "train_samples_per_s")


def reported_metrics(kind: str, num_classes: int | None = None) -> list[str]:
    """Every metric the loop reports each epoch for a task: what a sweep can optimize.

    ``num_classes`` is the feature set's (``num_outputs``): a binary task also reports
    ``valid_precision`` and ``valid_recall``. Without it, the metrics every task of ``kind``
    reports."""
    names = list(VALIDATION_METRICS[kind])
    if kind == "classification" and num_classes == 2:
        names += BINARY_VALIDATION_METRICS
    return [*TRAIN_METRICS, *(f"valid_{name}" for name in names)]
