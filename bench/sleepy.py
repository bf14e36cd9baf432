"""A 1-second trainable for the sweep benchmark: a scikit-learn classifier whose fit sleeps."""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


class SleepyClassifier(ClassifierMixin, BaseEstimator):
    """Fits in ``seconds`` (asleep), then predicts the training split's class frequencies."""

    def __init__(self, seconds: float = 1.0, alpha: float = 0.0) -> None:
        self.seconds = seconds
        self.alpha = alpha

    def fit(self, x: np.ndarray, y: np.ndarray) -> SleepyClassifier:
        time.sleep(self.seconds)
        self.classes_, counts = np.unique(y, return_counts=True)
        self.prior_ = counts / counts.sum()
        self.n_features_in_ = x.shape[1]
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.tile(self.prior_, (len(x), 1))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(x), axis=1)]
