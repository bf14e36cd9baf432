"""Data prepare: check the raw rows, pick the feature columns and encode the target.

Every check raises ``UserError`` naming the column and the fix, before anything is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylens.errors import UserError, did_you_mean
from raylens.features.config import DataConfig
from raylens.features.encoders import FittedEncoder, encode_table, encoded_feature_columns
from raylens.features.store import TARGET

Task = Literal["classification", "regression"]

MAX_INFERRED_CLASSES = 20
"""An integer target with at most this many distinct values is taken for classes; with more, for a
quantity (prices, counts) to regress. ``data.task`` overrides the inference either way."""


@dataclass(frozen=True)
class PreparedData:
    """Validated rows: a float32 feature matrix and an encoded target.

    For classification ``y`` holds class indices into ``classes``; for regression, the raw values.
    """

    x: np.ndarray
    y: np.ndarray
    feature_columns: list[str]
    task: Task
    classes: list[str | int | float | bool] | None
    task_decision: str = ""
    """Why the task is what it is, in words a user can act on (recorded in the manifest)."""
    input_columns: list[str] | None = None
    """The source's columns the features come from, where encodings made ``feature_columns``
    other than them (what the registered model takes)."""


@dataclass(frozen=True)
class PreparedTarget:
    """The encoded target alone: enough to split before the encodings are fitted."""

    y: np.ndarray
    task: Task
    classes: list[str | int | float | bool] | None
    task_decision: str


def candidate_features(columns: list[str], data: DataConfig) -> list[str]:
    """The feature columns the data config chooses among ``columns``: ``data.features``, or
    every column but the target, the entity id and ``drop``."""
    if data.features is not None:
        return list(data.features)
    # An entity's id is a key, never a feature.
    return [c for c in columns if c not in (data.target, data.entity) and c not in data.drop]


def prepare(
    table: pa.Table,
    data: DataConfig,
    allow_missing: set[str] | frozenset[str] = frozenset(),
    encoders: Sequence[FittedEncoder] = (),
) -> PreparedData:
    """Validate ``table`` against the data config and return arrays ready to split. Missing values
    in ``allow_missing`` (columns an impute transform fills) become NaN instead of an error;
    ``encoders`` turn their source columns into numeric features first."""
    input_columns = checked_feature_columns(table.column_names, table.num_rows, data)
    feature_columns = input_columns
    if encoders:
        feature_columns = encoded_feature_columns(encoders, input_columns)
        table = encode_table(encoders, table, input_columns)
    check_feature_values(table, feature_columns, allow_missing)
    x = feature_block(table, feature_columns)
    target = prepare_target(table, data)
    return PreparedData(
        x,
        target.y,
        feature_columns,
        target.task,
        target.classes,
        target.task_decision,
        input_columns if encoders else None,
    )


def feature_block(table: pa.Table, feature_columns: list[str]) -> np.ndarray:
    """The float32 matrix of ``table``'s (checked, numeric) feature columns, one row per row."""
    x = np.empty((table.num_rows, len(feature_columns)), dtype=np.float32)
    for i, name in enumerate(feature_columns):
        column = table.column(name)
        missing, _ = missing_and_infinite(column)
        # A missing value (allowed: an impute transform fills it) as NaN, whatever the type.
        x[:, i] = (column if not missing else pc.cast(column, pa.float64())).to_numpy(zero_copy_only=False)
    return x


def check_feature_values(
    table: pa.Table, columns: list[str], allow_missing: set[str] | frozenset[str] = frozenset()
) -> None:
    """Refuse a feature column that is not numbers (no encoding makes it numbers), or holds a
    missing value (outside ``allow_missing``) or an infinite one."""
    for name in columns:
        column = table.column(name)
        check_feature_type(name, column.type)
        missing, infinite = missing_and_infinite(column)
        check_feature_counts(name, missing if name not in allow_missing else 0, infinite)


def check_feature_type(name: str, type_: pa.DataType) -> None:
    """Refuse a feature column that is not numbers (no encoding makes it numbers)."""
    if not (pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_)):
        raise UserError(
            f"data: feature column '{name}' has type {type_}, and features must be numeric; "
            f"encode it (features.transforms: one_hot, ordinal or hashing of [{name}]) "
            f"or leave it out with data.drop: [{name}]"
        )


def check_feature_counts(name: str, missing: int, infinite: int) -> None:
    """Refuse a feature column with missing values (that no transform fills) or infinite ones."""
    if missing:
        raise UserError(
            f"data: feature column '{name}' has {missing} missing values; "
            f"fill them before training or leave the column out with data.drop: [{name}]"
        )
    if infinite:
        raise UserError(
            f"data: feature column '{name}' has {infinite} rows that are infinite (inf or -inf); "
            f"replace them with finite numbers or leave the column out with data.drop: [{name}]"
        )


def checked_feature_columns(columns: list[str], rows: int | None, data: DataConfig) -> list[str]:
    """The source's feature columns (of ``columns``, over ``rows`` rows; None: not counted yet),
    after every check of the columns the spec names."""
    duplicated = sorted(name for name, count in Counter(columns).items() if count > 1)
    if duplicated:
        raise UserError(
            f"data.source: '{data.source}' has more than one column named "
            f"{', '.join(repr(name) for name in duplicated)}; rename the columns so each name is unique"
        )
    if rows == 0:
        raise UserError(f"data.source: '{data.source}' has no rows; point it at a non-empty data set")
    if data.target not in columns:
        raise UserError(
            f"data.target: column '{data.target}' is not in the data{did_you_mean(data.target, columns)}; "
            f"columns are: {_listing(columns)}"
        )
    if data.entity is not None and data.entity not in columns:
        raise UserError(
            f"data.entity: column '{data.entity}' is not in the data{did_you_mean(data.entity, columns)}; "
            f"columns are: {_listing(columns)}"
        )
    for name in [*data.drop, *(data.features or [])]:
        if name not in columns:
            raise UserError(
                f"data: column '{name}' is not in the data{did_you_mean(name, columns)}; "
                f"columns are: {_listing(columns)}"
            )
    if data.features is not None and data.target in data.features:
        raise UserError(f"data.features: the target '{data.target}' cannot also be a feature")
    feature_columns = candidate_features(columns, data)
    if not feature_columns:
        raise UserError("data: no feature columns are left; list them in data.features")
    if TARGET in feature_columns:
        # The store keeps the encoded target under this name; a feature there would overwrite it.
        raise UserError(
            f"data: column '{TARGET}' is a name raylens keeps for the stored target; "
            f"rename the column, or leave it out with data.drop: [{TARGET}]"
        )
    return feature_columns


def prepare_target(table: pa.Table, data: DataConfig) -> PreparedTarget:
    """The target of ``table``, checked and encoded (class indices, or the values to regress)."""
    target = table.column(data.target)
    missing, infinite = missing_and_infinite(target)
    if missing:
        raise UserError(
            f"data.target: column '{data.target}' has {missing} missing values (null or NaN); drop those rows"
        )
    if infinite:
        # An infinite target turns every loss and metric into inf or NaN on the first batch.
        raise UserError(
            f"data.target: column '{data.target}' has {infinite} rows that are infinite (inf or -inf); "
            "drop those rows or replace them with finite numbers"
        )
    task, decision = decide_task(target, data)
    if task == "classification":
        classes, codes = np.unique(target.to_numpy(zero_copy_only=False), return_inverse=True)
        if len(classes) < 2:
            raise UserError(
                f"data.target: column '{data.target}' has a single class; classification needs two or more"
            )
        labels = [c.item() if hasattr(c, "item") else c for c in classes]
        return PreparedTarget(codes.astype(np.int64), task, labels, decision)
    if not (pa.types.is_integer(target.type) or pa.types.is_floating(target.type)):
        raise UserError(
            f"data.task: regression needs a numeric target, and '{data.target}' has type {target.type}"
        )
    return PreparedTarget(target.to_numpy(zero_copy_only=False).astype(np.float32), task, None, decision)


def missing_and_infinite(column: pa.Array | pa.ChunkedArray) -> tuple[int, int]:
    """Rows that are null or NaN, and rows that are +inf or -inf (NaN and inf exist in floats only)."""
    if not pa.types.is_floating(column.type):
        return column.null_count, 0
    nan = int(pc.sum(pc.is_nan(column)).as_py() or 0)
    inf = int(pc.sum(pc.is_inf(column)).as_py() or 0)
    return column.null_count + nan, inf


def decide_task(target: pa.ChunkedArray, data: DataConfig) -> tuple[Task, str]:
    """The task, and why: as the spec says, or inferred from the target's type and values."""
    name = data.target
    if data.task != "auto":
        return data.task, f"{data.task}, as data.task says"
    if pa.types.is_floating(target.type):
        return "regression", f"regression: '{name}' holds decimal numbers (set data.task to override)"
    if pa.types.is_integer(target.type):
        distinct = len(pc.unique(target))
        if distinct > MAX_INFERRED_CLASSES:
            return "regression", (
                f"regression: '{name}' holds {distinct} distinct whole numbers, more than "
                f"{MAX_INFERRED_CLASSES} classes (set data.task: classification if they are classes)"
            )
        return "classification", (
            f"classification: '{name}' holds {distinct} distinct whole numbers, at most "
            f"{MAX_INFERRED_CLASSES} (set data.task: regression if it is a quantity)"
        )
    return "classification", f"classification: '{name}' holds labels of type {target.type}"


def _listing(columns: list[str], limit: int = 12) -> str:
    shown = ", ".join(columns[:limit])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > limit else "")
