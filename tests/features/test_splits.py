import numpy as np
import pytest

from raylens.errors import UserError
from raylens.features import SplitConfig
from raylens.features.splits import split_rows


def test_same_seed_same_split_other_seed_other_split() -> None:
    y = np.repeat(np.arange(4), 50)
    first = split_rows(y, SplitConfig(valid=0.2, test=0.1, seed=7), stratify=True)
    again = split_rows(y, SplitConfig(valid=0.2, test=0.1, seed=7), stratify=True)
    other = split_rows(y, SplitConfig(valid=0.2, test=0.1, seed=8), stratify=True)
    for a, b in zip(
        (first.train, first.valid, first.test), (again.train, again.valid, again.test), strict=True
    ):
        assert np.array_equal(a, b)
    assert not np.array_equal(first.test, other.test)


def test_splits_partition_the_rows_with_the_asked_sizes() -> None:
    y = np.repeat(np.arange(4), 50)
    split = split_rows(y, SplitConfig(valid=0.2, test=0.1, seed=0), stratify=True)
    together = np.concatenate([split.train, split.valid, split.test])
    assert sorted(together.tolist()) == list(range(200))
    assert (len(split.train), len(split.valid), len(split.test)) == (140, 40, 20)


def test_stratified_split_keeps_class_shares() -> None:
    y = np.array([0] * 180 + [1] * 20)
    split = split_rows(y, SplitConfig(valid=0.25, test=0.25, seed=0), stratify=True)
    for part in (split.train, split.valid, split.test):
        assert np.isclose(y[part].mean(), 0.1, atol=0.011)


def test_too_few_rows_to_split() -> None:
    with pytest.raises(UserError, match="cannot be split"):
        split_rows(np.array([0, 1]), SplitConfig(valid=0.15, test=0.15), stratify=False)
