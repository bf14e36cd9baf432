"""Feature transforms, fitted on the training split only and stored with the feature set.

A fitted transform is plain data (JSON-able parameters), so the registered model can apply the
exact same arithmetic to raw rows at serving time: what is served cannot skew from what trained.
Each is ``out = (f(x) - shift) / scale`` on its columns for some elementwise ``f``: identity
(standardize, min_max), log1p, clip to [low, high], or missing values filled (impute).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from raylens.errors import UserError
from raylens.features.config import (
    ClipStep,
    EncodingStep,
    ImputeStep,
    Log1pStep,
    MinMaxStep,
    NumericStep,
    TransformStep,
)

KINDS = ("standardize", "min_max", "log1p", "clip", "impute")


@dataclass(frozen=True)
class FittedTransform:
    """One fitted step: ``(f(x) - shift) / scale`` on ``columns``, ``f`` by ``kind``."""

    columns: list[str]
    shift: list[float]
    scale: list[float]
    kind: str = "standardize"
    low: list[float] = field(default_factory=list)
    """clip: each column's lower bound (-inf: none)."""
    high: list[float] = field(default_factory=list)
    """clip: each column's upper bound (inf: none)."""
    fill: list[float] = field(default_factory=list)
    """impute: each column's value for a missing one."""

    def _f(self, block: np.ndarray) -> np.ndarray:
        if self.kind == "log1p":
            return np.log1p(block)
        if self.kind == "clip":
            return np.clip(block, np.asarray(self.low), np.asarray(self.high))
        if self.kind == "impute":
            return np.where(np.isnan(block), np.asarray(self.fill), block)
        return block

    def apply(self, x: np.ndarray, feature_columns: list[str]) -> np.ndarray:
        index = [feature_columns.index(c) for c in self.columns]
        out = x.astype(np.float32, copy=True)
        block = self._f(out[:, index].astype(np.float64))
        out[:, index] = (block - np.asarray(self.shift)) / np.asarray(self.scale)
        return out

    def invert(self, x: np.ndarray, feature_columns: list[str]) -> np.ndarray:
        """Back towards the source's values: exact for standardize, min_max and log1p; clipped
        and filled values stay as the model saw them."""
        index = [feature_columns.index(c) for c in self.columns]
        out = x.astype(np.float64, copy=True)
        block = out[:, index] * np.asarray(self.scale) + np.asarray(self.shift)
        out[:, index] = np.expm1(block) if self.kind == "log1p" else block
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v != [] or k in ("columns", "shift", "scale")}


def _columns(
    chosen: str | list[str], feature_columns: list[str], kind: str, every: list[str] | None = None
) -> list[str]:
    columns = (feature_columns if every is None else every) if chosen == "*" else list(chosen)
    unknown = [c for c in columns if c not in feature_columns]
    if unknown:
        raise UserError(
            f"features.transforms: {kind} names {', '.join(unknown)}, which are not feature columns"
        )
    return columns


def fit_transform(
    step: NumericStep, x_train: np.ndarray, feature_columns: list[str], every: list[str] | None = None
) -> FittedTransform:
    """Fit one step on the training split's rows (as the steps before it left them); ``every``:
    the columns ``"*"`` stands for (default: all)."""
    if isinstance(step, ClipStep):
        columns = _columns(step.clip.columns, feature_columns, "clip", every)
        n = len(columns)
        low = [step.clip.min if step.clip.min is not None else -np.inf] * n
        high = [step.clip.max if step.clip.max is not None else np.inf] * n
        return FittedTransform(columns, [0.0] * n, [1.0] * n, "clip", low=low, high=high)
    if isinstance(step, ImputeStep):
        columns = _columns(step.impute.columns, feature_columns, "impute", every)
        block = x_train[:, [feature_columns.index(c) for c in columns]].astype(np.float64)
        if step.impute.strategy == "constant":
            fill = [step.impute.value] * len(columns)
        else:
            pick = np.nanmean if step.impute.strategy == "mean" else np.nanmedian
            with np.errstate(all="ignore"):
                values = pick(block, axis=0) if len(block) else np.full(len(columns), np.nan)
            empty = [c for c, v in zip(columns, values, strict=True) if np.isnan(v)]
            if empty:
                raise UserError(
                    f"features.transforms: impute's {step.impute.strategy} of {', '.join(empty)} is "
                    "undefined: the training split holds no value there; use strategy: constant"
                )
            fill = [float(v) for v in values]
        return FittedTransform(columns, [0.0] * len(columns), [1.0] * len(columns), "impute", fill=fill)
    if isinstance(step, Log1pStep):
        columns = _columns(step.log1p, feature_columns, "log1p", every)
        block = x_train[:, [feature_columns.index(c) for c in columns]].astype(np.float64)
        smallest = block.min(axis=0) if len(block) else np.zeros(len(columns))
        undefined = [c for c, v in zip(columns, smallest, strict=True) if v <= -1]
        if undefined:
            raise UserError(
                f"features.transforms: log1p of {', '.join(undefined)} is undefined: values at or below -1 "
                "there; clip them first or leave the columns out"
            )
        return FittedTransform(columns, [0.0] * len(columns), [1.0] * len(columns), "log1p")
    chosen, kind = (
        (step.min_max, "min_max") if isinstance(step, MinMaxStep) else (step.standardize, "standardize")
    )
    columns = _columns(chosen, feature_columns, kind, every)
    block = x_train[:, [feature_columns.index(c) for c in columns]].astype(np.float64)
    if kind == "min_max":
        smallest = block.min(axis=0) if len(block) else np.zeros(len(columns))
        spread = (block.max(axis=0) - smallest) if len(block) else np.ones(len(columns))
        scale = np.where(spread > 1e-12, spread, 1.0)
        return FittedTransform(columns, [float(v) for v in smallest], [float(v) for v in scale], "min_max")
    mean = block.mean(axis=0) if len(block) else np.zeros(len(columns))
    std = block.std(axis=0) if len(block) else np.ones(len(columns))
    scale = np.where(std > 1e-12, std, 1.0)
    return FittedTransform(columns, [float(v) for v in mean], [float(v) for v in scale], "standardize")


def transforms_from_dicts(items: list[dict[str, Any]]) -> list[FittedTransform]:
    """Rebuild fitted transforms from a manifest (or a registered model's spec)."""
    fitted = []
    for item in items:
        kind = item.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown fitted transform {kind!r}")
        if "mean" in item and "shift" not in item:  # stored before transforms had a shift
            item = {**item, "shift": item["mean"]}
        fitted.append(
            FittedTransform(
                item["columns"],
                item["shift"],
                item["scale"],
                str(kind),
                low=item.get("low", []),
                high=item.get("high", []),
                fill=item.get("fill", []),
            )
        )
    return fitted


def fit_all(
    steps: list[TransformStep],
    x_train: np.ndarray,
    feature_columns: list[str],
    encoded: set[str] | frozenset[str] = frozenset(),
) -> list[FittedTransform]:
    """Fit the numeric steps in order, each on the training rows as the steps before it left them
    (encodings ran before, on the source: see ``raylens.features.encoders``). ``"*"`` stands for
    every feature column but the ``encoded`` ones (a one-hot column is no quantity to scale)."""
    fitted: list[FittedTransform] = []
    every = [c for c in feature_columns if c not in encoded]
    x = x_train
    for step in steps:
        if isinstance(step, EncodingStep):
            continue
        transform = fit_transform(step, x, feature_columns, every)
        fitted.append(transform)
        x = transform.apply(x, feature_columns)
    return fitted


def invert_all(transforms: list[FittedTransform], x: np.ndarray, feature_columns: list[str]) -> np.ndarray:
    """Back from stored features to the raw columns (for input examples and plots)."""
    for transform in reversed(transforms):
        x = transform.invert(x, feature_columns)
    return x


def apply_all(transforms: list[FittedTransform], x: np.ndarray, feature_columns: list[str]) -> np.ndarray:
    for transform in transforms:
        x = transform.apply(x, feature_columns)
    return x.astype(np.float32, copy=False)
