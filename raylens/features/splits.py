"""Reproducible train/valid/test splits: the same rows, seed and fractions give the same split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raylens.errors import UserError
from raylens.features.config import SplitConfig


@dataclass(frozen=True)
class SplitIndices:
    """Row indices of each split into the prepared arrays."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def split_rows(
    y: np.ndarray, config: SplitConfig, stratify: bool, labels: Sequence[object] | None = None
) -> SplitIndices:
    """Split row indices; stratified by ``y`` for classification so every split keeps class shares.
    ``labels`` names the classes when ``y`` holds their indices (for messages)."""
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
