import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, PlannedFeatureSet, SplitConfig, plan_feature_set
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


def _events(rows: int = 300) -> pd.DataFrame:
    """Rows in a shuffled order: a time (hours, with ties), a customer, a feature and a label."""
    rng = np.random.default_rng(7)
    start = pd.Timestamp("2024-01-01")
    return pd.DataFrame(
        {
            "at": [start + pd.Timedelta(hours=int(h)) for h in rng.integers(0, 100, rows)],
            "customer": rng.integers(0, 40, rows),
            "x": rng.normal(size=rows),
            "label": rng.integers(0, 2, rows),
        }
    )


def _planned(tmp_path: Path, frame: pd.DataFrame, **split: object) -> PlannedFeatureSet:
    frame.to_csv(tmp_path / "events.csv", index=False)
    data = DataConfig(source="events.csv", target="label", features=["x"], split=split)
    return plan_feature_set("events", data, FeaturesConfig(), tmp_path)


def test_a_time_split_trains_on_the_past_and_tests_on_the_future(tmp_path: Path) -> None:
    frame = _events()
    planned = _planned(tmp_path, frame, valid=0.2, test=0.2, time="at")
    times = {
        split: frame.set_index(frame["x"].astype(np.float32)).loc[planned.splits[split].x[:, 0], "at"]
        for split in ("train", "valid", "test")
    }
    assert times["train"].max() < times["valid"].min() and times["valid"].max() < times["test"].min()
    assert sum(len(t) for t in times.values()) == len(frame)
    assert abs(len(times["test"]) - 60) <= 12  # a time's rows stay together: near, not exactly, 20 %
    assert planned.manifest.split.time == "at" and not planned.manifest.split.stratified
    again = _planned(tmp_path, frame.sample(frac=1, random_state=1), valid=0.2, test=0.2, time="at")
    assert sorted(again.splits["test"].x[:, 0]) == sorted(planned.splits["test"].x[:, 0])


def test_a_group_split_keeps_each_group_in_one_split(tmp_path: Path) -> None:
    frame = _events()
    planned = _planned(tmp_path, frame, valid=0.2, test=0.2, group="customer", seed=3)
    by_x = frame.set_index(frame["x"].astype(np.float32))["customer"]
    groups = {split: set(by_x.loc[planned.splits[split].x[:, 0]]) for split in ("train", "valid", "test")}
    assert not groups["train"] & groups["valid"] and not groups["train"] & groups["test"]
    assert not groups["valid"] & groups["test"] and len(set.union(*groups.values())) == 40
    assert 50 <= len(planned.splits["test"]) <= 90  # whole groups: about 20 %
    same = _planned(tmp_path, frame, valid=0.2, test=0.2, group="customer", seed=3)
    other = _planned(tmp_path, frame, valid=0.2, test=0.2, group="customer", seed=4)
    assert np.array_equal(same.splits["test"].x, planned.splits["test"].x)
    assert not np.array_equal(other.splits["test"].x, planned.splits["test"].x)


@pytest.mark.parametrize(
    ("frame", "split", "says"),
    [
        (
            _events().assign(at="soon"),
            {"time": "at"},
            "column 'at' has type string, and times must be timestamps",
        ),
        (_events(), {"time": "when"}, "data.split.time: column 'when' is not in the data"),
        (
            _events().assign(customer=[None] + [1] * 299),
            {"group": "customer"},
            "has 1 missing values (rows 0)",
        ),
        (_events().assign(customer=1), {"group": "customer"}, "has 1 groups, too few"),
        (_events().assign(at=pd.Timestamp("2024-01-01")), {"time": "at"}, "too few distinct times"),
    ],
)
def test_a_split_column_that_cannot_split_is_refused_naming_it(
    tmp_path: Path, frame: pd.DataFrame, split: dict[str, str], says: str
) -> None:
    with pytest.raises(UserError, match=re.escape(says)):
        _planned(tmp_path, frame, **split)


def test_time_and_group_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        SplitConfig(time="at", group="customer")
