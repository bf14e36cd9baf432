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
CHUNK_ROWS = 65_536
"""Rows transformed (and summed, to fit) at once: a float64 copy of a slice, not of the matrix."""


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
        out = x.astype(np.float32, copy=True)
        self.apply_in_place(out, feature_columns)
        return out

    def apply_in_place(self, x: np.ndarray, feature_columns: list[str]) -> None:
        """Transform the float32 matrix ``x`` where it is, a slice of rows at a time (the float64
        arithmetic never holds more than a slice)."""
        index = [feature_columns.index(c) for c in self.columns]
        shift, scale = np.asarray(self.shift), np.asarray(self.scale)
        for start in range(0, len(x), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            block = self._f(x[rows][:, index].astype(np.float64))
            x[rows, index] = (block - shift) / scale

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
        smallest, _ = _min_and_max(x_train, [feature_columns.index(c) for c in columns])
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
    if kind == "min_max":
        smallest, largest = _min_and_max(x_train, [feature_columns.index(c) for c in columns])
        spread = largest - smallest if len(x_train) else np.ones(len(columns))
        scale = np.where(spread > 1e-12, spread, 1.0)
        return FittedTransform(columns, [float(v) for v in smallest], [float(v) for v in scale], "min_max")
    mean, std = _mean_and_std(x_train, [feature_columns.index(c) for c in columns])
    scale = np.where(std > 1e-12, std, 1.0)
    return FittedTransform(columns, [float(v) for v in mean], [float(v) for v in scale], "standardize")


def _min_and_max(x: np.ndarray, index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each column's smallest and largest value (zeros for no rows), column by column in place."""
    if not len(x):
        return np.zeros(len(index)), np.zeros(len(index))
    return (
        np.array([float(x[:, i].min()) for i in index]),
        np.array([float(x[:, i].max()) for i in index]),
    )


def _mean_and_std(x: np.ndarray, index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each column's mean and (population) standard deviation in float64, two passes over slices
    of rows: the mean first, then the squared deviations from it (as exact as numpy's own)."""
    if not len(x):
        return np.zeros(len(index)), np.ones(len(index))
    total = np.zeros(len(index))
    for start in range(0, len(x), CHUNK_ROWS):
        total += x[start : start + CHUNK_ROWS][:, index].astype(np.float64).sum(axis=0)
    mean = total / len(x)
    squares = np.zeros(len(index))
    for start in range(0, len(x), CHUNK_ROWS):
        deviation = x[start : start + CHUNK_ROWS][:, index].astype(np.float64) - mean
        squares += (deviation * deviation).sum(axis=0)
    return mean, np.sqrt(squares / len(x))


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
    *,
    in_place: bool = False,
) -> list[FittedTransform]:
    """Fit the numeric steps in order, each on the training rows as the steps before it left them
    (encodings ran before, on the source: see ``raylens.features.encoders``). ``"*"`` stands for
    every feature column but the ``encoded`` ones (a one-hot column is no quantity to scale).
    ``in_place``: ``x_train`` (float32) is left transformed by every step, as ``apply_all`` would."""
    fitted: list[FittedTransform] = []
    every = [c for c in feature_columns if c not in encoded]
    numeric = [step for step in steps if not isinstance(step, EncodingStep)]
    if not numeric:
        return fitted
    x = x_train if in_place else x_train.astype(np.float32, copy=True)
    for step in numeric:
        transform = fit_transform(step, x, feature_columns, every)
        fitted.append(transform)
        transform.apply_in_place(x, feature_columns)
    return fitted


def invert_all(transforms: list[FittedTransform], x: np.ndarray, feature_columns: list[str]) -> np.ndarray:
    """Back from stored features to the raw columns (for input examples and plots)."""
    for transform in reversed(transforms):
        x = transform.invert(x, feature_columns)
    return x


def apply_all(
    transforms: list[FittedTransform], x: np.ndarray, feature_columns: list[str], *, in_place: bool = False
) -> np.ndarray:
    """The transformed matrix (float32); ``in_place``: ``x``, a float32 matrix, transformed itself."""
    out = x if in_place and x.dtype == np.float32 else x.astype(np.float32, copy=True)
    for transform in transforms:
        transform.apply_in_place(out, feature_columns)
    return out
