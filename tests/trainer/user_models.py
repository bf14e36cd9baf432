"""A user model factory and estimator, as a user's own package would define them."""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from torch import nn


def tiny(in_features: int, out_features: int, width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, out_features))


class NanRegressor(RegressorMixin, BaseEstimator):
    """A scikit-learn regressor whose predictions are not numbers: a diverged fit."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def fit(self, x: np.ndarray, y: np.ndarray) -> NanRegressor:
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), np.nan)


def slow_to_build(in_features: int, out_features: int, seconds: float = 0.5) -> nn.Module:
    """A model whose construction takes a while (a download, a large init): a slow start."""
    time.sleep(seconds)
    return tiny(in_features, out_features)
