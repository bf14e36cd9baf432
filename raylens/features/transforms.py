"""Feature transforms, fitted on the training split only and stored with the feature set.

A fitted transform is plain data (JSON-able parameters), so the registered model can apply the
exact same arithmetic to raw rows at serving time: what is served cannot skew from what trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from raylens.errors import UserError
from raylens.features.config import StandardizeStep


@dataclass(frozen=True)
class FittedStandardize:
    """``(x - mean) / scale`` on the named columns; scale is 1 where a column is constant."""

    columns: list[str]
    mean: list[float]
    scale: list[float]
    kind: str = "standardize"

    def apply(self, x: np.ndarray, feature_columns: list[str]) -> np.ndarray:
        index = [feature_columns.index(c) for c in self.columns]
        out = x.astype(np.float32, copy=True)
        out[:, index] = (out[:, index] - np.asarray(self.mean, np.float32)) / np.asarray(
            self.scale, np.float32
        )
        return out

    def invert(self, x: np.ndarray, feature_columns: list[str]) -> np.ndarray:
        index = [feature_columns.index(c) for c in self.columns]
        out = x.astype(np.float64, copy=True)
        out[:, index] = out[:, index] * np.asarray(self.scale) + np.asarray(self.mean)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_standardize(
    step: StandardizeStep, x_train: np.ndarray, feature_columns: list[str]
) -> FittedStandardize:
    columns = feature_columns if step.standardize == "*" else list(step.standardize)
    unknown = [c for c in columns if c not in feature_columns]
    if unknown:
        raise UserError(
            f"features.transforms: standardize names {', '.join(unknown)}, which are not feature columns"
        )
    index = [feature_columns.index(c) for c in columns]
    block = x_train[:, index].astype(np.float64)
    mean = block.mean(axis=0) if len(block) else np.zeros(len(index))
    std = block.std(axis=0) if len(block) else np.ones(len(index))
    scale = np.where(std > 1e-12, std, 1.0)
    return FittedStandardize(columns, [float(v) for v in mean], [float(v) for v in scale])


def transforms_from_dicts(items: list[dict[str, Any]]) -> list[FittedStandardize]:
    """Rebuild fitted transforms from a manifest."""
    fitted = []
    for item in items:
        if item.get("kind") != "standardize":
            raise ValueError(f"unknown fitted transform {item.get('kind')!r}")
        fitted.append(FittedStandardize(item["columns"], item["mean"], item["scale"]))
    return fitted


def invert_all(transforms: list[FittedStandardize], x: np.ndarray, feature_columns: list[str]) -> np.ndarray:
    """Back from stored features to the raw columns (for input examples and plots)."""
    for transform in reversed(transforms):
        x = transform.invert(x, feature_columns)
    return x


def apply_all(transforms: list[FittedStandardize], x: np.ndarray, feature_columns: list[str]) -> np.ndarray:
    for transform in transforms:
        x = transform.apply(x, feature_columns)
    return x.astype(np.float32, copy=False)
