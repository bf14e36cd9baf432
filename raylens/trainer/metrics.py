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


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    total = matrix.sum()
    return {
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "f1_macro": f1_macro(matrix),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    y_true = y_true.astype(np.float64)
    y_pred = y_pred.astype(np.float64)
    error = y_pred - y_true
    ss_res = float(np.sum(error**2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:  # scikit-learn's force_finite convention for a constant target
        r2 = 1.0 if ss_res == 0 else 0.0
    return {
        "rmse": float(np.sqrt(np.mean(error**2))),
        "mae": float(np.mean(np.abs(error))),
        "r2": r2,
    }
