"""Validation metrics, computed from predictions with NumPy (no framework in the way).

Classification: loss, accuracy, macro F1 and the confusion matrix (rows: true class, columns:
predicted class). Regression: loss, RMSE, MAE and R². Each function matches scikit-learn's
definition of the same name (``tests/trainer/test_metrics.py`` checks it).
"""

from __future__ import annotations

import numpy as np


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


def summarize(
    y_true: np.ndarray, y_pred: np.ndarray, loss_sum: float, kind: str, num_classes: int, shift: float = 0.0
) -> np.ndarray:
    """Additive statistics of a set of predictions: summaries of shards add up to the summary of
    the whole, so ranks can score their share of rows and all-reduce one vector.

    Regression sums the target as ``y - shift``: R² needs the target's squared deviations, and
    from raw sums (sum y², (sum y)²) they cancel catastrophically when the target sits far from
    zero (y = 1e6 + noise gave R² = 0.0 for -3.58). Every shard must use the same shift; one near
    the target's mean (the training mean) keeps the sums small and exact enough."""
    head = [loss_sum, float(len(y_true))]
    if kind == "classification":
        return np.concatenate([head, confusion_matrix(y_true, y_pred, num_classes).ravel()]).astype(
            np.float64
        )
    y, error = y_true.astype(np.float64) - shift, y_pred.astype(np.float64) - y_true.astype(np.float64)
    return np.array(
        [*head, np.sum(error**2), np.sum(np.abs(error)), np.sum(y), np.sum(y**2)], dtype=np.float64
    )


def metrics_from_summary(summary: np.ndarray, kind: str, num_classes: int) -> dict[str, float]:
    loss_sum, n = float(summary[0]), float(summary[1])
    if n == 0:
        return {}
    metrics = {"loss": loss_sum / n}
    if kind == "classification":
        matrix = summary[2:].reshape(num_classes, num_classes)
        metrics["accuracy"] = float(np.trace(matrix) / n)
        metrics["f1_macro"] = f1_macro(matrix)
        return metrics
    sq_error, abs_error, sum_y, sum_y2 = (float(v) for v in summary[2:6])
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


VALIDATION_METRICS = {
    "classification": ("loss", "accuracy", "f1_macro"),
    "regression": ("loss", "rmse", "mae", "r2"),
}
TRAIN_METRICS = ("epoch", "train_loss", "train_samples_per_s")


def reported_metrics(kind: str) -> list[str]:
    """Every metric the loop reports each epoch for a task: what a sweep can optimize."""
    return [*TRAIN_METRICS, *(f"valid_{name}" for name in VALIDATION_METRICS[kind])]
