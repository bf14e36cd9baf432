"""Reproducible train/valid/test splits: the same rows, seed and fractions give the same split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raylens.errors import UserError, did_you_mean
from raylens.features.config import SplitConfig

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class SplitIndices:
    """Row indices of each split into the prepared arrays."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def split_rows(
    y: np.ndarray,
    config: SplitConfig,
    stratify: bool,
    labels: Sequence[object] | None = None,
    by: np.ndarray | None = None,
) -> SplitIndices:
    """Split row indices; stratified by ``y`` for classification so every split keeps class shares.
    ``labels`` names the classes when ``y`` holds their indices (for messages). With
    ``config.time`` or ``config.group``, ``by`` holds that column's values (``split_column``)."""
    n = len(y)
    rows = np.arange(n)
    held_out = config.valid + config.test
    n_held = round(n * held_out)
    if (
        n - n_held < 1
        or (config.valid > 0 and round(n * config.valid) < 1)
        or (config.test > 0 and round(n * config.test) < 1)
    ):
        raise UserError(
            f"data.split: {n} rows cannot be split into train/valid/test = "
            f"{1 - held_out:g}/{config.valid:g}/{config.test:g}; use more rows or other fractions"
        )
    if n_held == 0:
        return SplitIndices(rows, rows[:0], rows[:0])
    if by is not None and config.time is not None:
        return _by_time(by, n - n_held, round(n * config.valid), config.time)
    if by is not None and config.group is not None:
        return _by_group(by, round(n * config.test), round(n * config.valid), config)
    # Imported here: the served model imports raylens.features, and needs no scikit-learn.
    from sklearn.model_selection import train_test_split

    try:
        train, held = train_test_split(
            rows, test_size=n_held, random_state=config.seed, stratify=y if stratify else None
        )
        if config.valid == 0 or config.test == 0:
            empty = rows[:0]
            valid, test = (held, empty) if config.test == 0 else (empty, held)
        else:
            valid, test = train_test_split(
                held,
                test_size=config.test / held_out,
                random_state=config.seed,
                stratify=y[held] if stratify else None,
            )
    except ValueError:
        raise UserError(_why_not_stratified(y, n, n_held, labels)) from None
    return SplitIndices(np.sort(train), np.sort(valid), np.sort(test))


def _why_not_stratified(y: np.ndarray, n: int, n_held: int, labels: Sequence[object] | None) -> str:
    """A stratified split needs every class at least twice, and as many held-out rows as classes:
    say which it is, briefly (a target taken for thousands of classes would list them all)."""
    classes, counts = np.unique(y, return_counts=True)
    rare = classes[counts < 2]
    if len(rare):
        named = [labels[int(code)] if labels is not None else code for code in rare[:5]]
        first = ", ".join(str(label) for label in named) + (", ..." if len(rare) > 5 else "")
        problem = f"{len(rare)} of its {len(classes)} classes have a single row ({first})"
    else:
        problem = f"{len(classes)} classes do not fit in the {n_held} held-out rows"
    return (
        f"data.split: cannot stratify {n} rows by class: {problem}. If the target is a quantity, set "
        "data.task: regression; otherwise use more rows, larger valid/test fractions, or merge rare classes"
    )


def split_column(table: pa.Table, config: SplitConfig) -> np.ndarray | None:
    """The values of the column ``data.split.time`` or ``data.split.group`` names, checked: times
    must be timestamps, dates or numbers, and neither may be missing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    name = config.time or config.group
    if name is None:
        return None
    key = "data.split.time" if config.time else "data.split.group"
    if name not in table.column_names:
        raise UserError(
            f"{key}: column '{name}' is not in the data{did_you_mean(name, table.column_names)}; "
            f"columns are: {', '.join(table.column_names[:30])}"
        )
    column = table.column(name)
    if config.time and not (
        pa.types.is_timestamp(column.type)
        or pa.types.is_date(column.type)
        or pa.types.is_integer(column.type)
        or pa.types.is_floating(column.type)
    ):
        raise UserError(
            f"{key}: column '{name}' has type {column.type}, and times must be timestamps, dates or numbers; "
            "write them as ISO 8601 (2024-05-01T12:00:00), which CSV and Parquet read as timestamps"
        )
    missing = column.null_count
    if pa.types.is_floating(column.type):
        missing += int(pc.sum(pc.is_nan(column)).as_py() or 0)
    if missing:
        first = np.flatnonzero(pc.is_null(column, nan_is_null=True).to_numpy(zero_copy_only=False))[:5]
        raise UserError(
            f"{key}: column '{name}' has {missing} missing values (rows {', '.join(map(str, first))}"
            f"{', ...' if missing > 5 else ''}); fill them or drop those rows"
        )
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        column = (
            pc.cast(column, pa.int64())
            if pa.types.is_timestamp(column.type)
            else pc.cast(pc.cast(column, pa.date32()), pa.int32())
        )
    return np.asarray(column.to_numpy(zero_copy_only=False))


def _by_time(times: np.ndarray, n_train: int, n_valid: int, name: str) -> SplitIndices:
    """The earliest rows train, the next validate, the latest test; the rows of the time where a
    split would cut go to the earlier split, so no time is in two splits."""
    order = np.argsort(times, kind="stable")
    ordered = times[order]

    def cut(at: int) -> int:
        if at <= 0 or at >= len(ordered):
            return at
        return int(np.searchsorted(ordered, ordered[at - 1], side="right"))

    train_end = cut(n_train)
    valid_end = max(train_end, cut(n_train + n_valid))
    if train_end >= len(order) or (n_valid and valid_end == train_end):
        raise UserError(
            f"data.split.time: column '{name}' has too few distinct times to hold out the latest rows "
            "(one time takes every held-out row); split by a finer time or lower the fractions"
        )
    return SplitIndices(
        np.sort(order[:train_end]), np.sort(order[train_end:valid_end]), np.sort(order[valid_end:])
    )


def _by_group(groups: np.ndarray, n_test: int, n_valid: int, config: SplitConfig) -> SplitIndices:
    """Whole groups, drawn in a random order (``seed``), fill test, then valid, then train: each
    held-out split takes groups until it has its share of rows."""
    kinds, codes, counts = np.unique(groups, return_inverse=True, return_counts=True)
    drawn = np.random.default_rng(config.seed).permutation(len(kinds))
    assigned = np.zeros(len(kinds), dtype=np.int8)  # 0 train, 1 valid, 2 test
    filled = {2: 0, 1: 0}
    wanted = {2: n_test, 1: n_valid}
    for group in drawn:
        for split in (2, 1):
            if filled[split] < wanted[split]:
                assigned[group] = split
                filled[split] += int(counts[group])
                break
    rows = assigned[codes.reshape(-1)]
    train, valid, test = (np.flatnonzero(rows == split) for split in (0, 1, 2))
    if len(train) == 0 or (n_valid and len(valid) == 0) or (n_test and len(test) == 0):
        raise UserError(
            f"data.split.group: column '{config.group}' has {len(kinds)} groups, too few to give every "
            "split whole groups; use more groups or other fractions"
        )
    return SplitIndices(train, valid, test)
