"""Feature views joined point-in-time: each row gets the latest feature value at or before its
event time, never a later one, checked against a hand-worked case where a plain join on the
entity leaks the future; bad views are refused naming the view and column, nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, build_feature_set, plan_feature_set
from raylens.features.sources import load_source
from raylens.features.views import join_views

LABELS = pd.DataFrame(
    {
        "customer": ["a", "a", "b", "c"],
        "at": pd.to_datetime(["2024-01-05", "2024-01-10", "2024-01-07", "2024-01-02"]),
        "churned": [0, 1, 1, 0],
    }
)
ACTIVITY = pd.DataFrame(
    {
        "customer": ["a", "a", "b", "b", "c"],
        "updated": pd.to_datetime(["2024-01-01", "2024-01-08", "2024-01-07", "2024-01-09", "2024-01-03"]),
        "spend": [1.0, 2.0, 3.0, 4.0, 5.0],
    }
)


def _data(**view: object) -> DataConfig:
    return DataConfig(
        source="labels.parquet",
        target="churned",
        entity="customer",
        event_time="at",
        drop=["at"],
        views=[{"source": "activity.parquet", "time": "updated", **view}],  # type: ignore[list-item]
    )


def _write(tmp_path: Path, labels: pd.DataFrame = LABELS, activity: pd.DataFrame = ACTIVITY) -> None:
    labels.to_parquet(tmp_path / "labels.parquet", index=False)
    activity.to_parquet(tmp_path / "activity.parquet", index=False)


def test_each_row_gets_the_latest_value_at_or_before_its_time_never_a_later_one(tmp_path: Path) -> None:
    _write(tmp_path)
    joined = join_views(load_source("labels.parquet", tmp_path), _data(), tmp_path).table
    # By hand: a@01-05 sees only 01-01's 1.0 (01-08's 2.0 is later); a@01-10 sees 2.0; b@01-07
    # sees 3.0 (the same time counts); c@01-02 has nothing yet (05.0 arrives 01-03).
    assert joined.column("spend").to_pylist() == [1.0, 2.0, 3.0, None]
    assert joined.column("customer").to_pylist() == ["a", "a", "b", "c"]  # the rows' own order
    # What a plain join on the entity (the latest value, whenever it came) would have given:
    naive = LABELS.merge(ACTIVITY.sort_values("updated").groupby("customer").tail(1), on="customer")
    assert naive["spend"].tolist() == [2.0, 2.0, 4.0, 5.0]  # the future, leaked into a and b's first rows


def test_a_feature_set_built_from_views_keeps_the_joined_columns_and_fingerprints_the_views(
    tmp_path: Path,
) -> None:
    rows = pd.concat([LABELS] * 10, ignore_index=True)
    rows["at"] = rows["at"] + pd.to_timedelta(range(len(rows)), unit="s")
    _write(tmp_path, rows[rows["customer"] != "c"])
    planned = plan_feature_set("churn", _data(), FeaturesConfig(), tmp_path)
    assert planned.feature_columns == ["spend"] and sum(planned.manifest.rows.values()) == 30
    ACTIVITY.assign(spend=ACTIVITY["spend"] * 10).to_parquet(tmp_path / "activity.parquet", index=False)
    changed = plan_feature_set("churn", _data(), FeaturesConfig(), tmp_path)
    assert changed.source_fingerprint != planned.source_fingerprint  # a view's data is part of the source


@pytest.mark.parametrize(
    ("view", "activity", "says"),
    [
        (
            {"features": ["spent"]},
            ACTIVITY,
            "data.views[0].features: column 'spent' is not in activity.parquet",
        ),
        (
            {},
            ACTIVITY.assign(updated=ACTIVITY["updated"].astype(str).str.replace("-", "/")),
            "data.views[0].time: column 'updated' has type large_string, and its times must be timestamps",
        ),
        ({"entity": "client"}, ACTIVITY, "data.views[0].entity: column 'client' is not in activity.parquet"),
        (
            {},
            ACTIVITY.assign(churned=1),
            "column 'churned' of activity.parquet is already a column of the rows",
        ),
    ],
)
def test_a_view_that_cannot_be_joined_is_refused_naming_it_and_nothing_is_written(
    tmp_path: Path, view: dict[str, object], activity: pd.DataFrame, says: str
) -> None:
    _write(tmp_path, activity=activity)
    with pytest.raises(UserError, match=re.escape(says)):
        build_feature_set("churn", _data(**view), FeaturesConfig(), tmp_path / "store", tmp_path)
    assert not (tmp_path / "store").exists()


def test_views_need_an_entity_and_an_event_time() -> None:
    with pytest.raises(ValueError, match="set entity and event_time"):
        DataConfig(source="x.csv", target="y", views=[{"source": "v.csv", "time": "t"}])  # type: ignore[list-item]
