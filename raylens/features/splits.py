"""Reproducible train/valid/test splits: the same rows, seed and fractions give the same split."""

from __future__ import annotations

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


def split_rows(y: np.ndarray, config: SplitConfig, stratify: bool) -> SplitIndices:
    """Split row indices; stratified by ``y`` for classification so every split keeps class shares."""
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
    except ValueError as exc:
        raise UserError(
            f"data.split: cannot stratify {n} rows ({exc}); use more rows or larger split fractions"
        ) from None
    return SplitIndices(np.sort(train), np.sort(valid), np.sort(test))
