"""The online store: the latest feature vector per entity, materialized from a stored version into
SQLite, looked up by id; `raylens features materialize` on the CLI."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from raylens.cluster.cli import app
from raylens.cluster.workspace import Workspace
from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, build_feature_set
from raylens.features.config import ValidationConfig
from raylens.features.online import SqliteOnlineStore, latest_per_entity, materialize
from tests.servers import S3Server

FEATURES = FeaturesConfig(transforms=[{"standardize": "*"}])


def _events(rows: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "at": pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.permutation(rows), unit="h"),
            "customer": [f"c{i}" for i in rng.integers(0, 50, rows)],
            "spend": rng.normal(100, 20, rows),
            "visits": rng.integers(0, 30, rows),
            "churned": rng.integers(0, 2, rows),
        }
    )


def _data(**extra: object) -> DataConfig:
    return DataConfig(
        source="events.csv",
        target="churned",
        entity="customer",
        drop=["at"],
        split={"valid": 0.2, "test": 0.2, "time": "at"},
        **extra,  # type: ignore[arg-type]
    )


def test_materialize_keeps_each_entitys_latest_row_and_get_looks_them_up(tmp_path: Path) -> None:
    frame = _events()
    frame.to_csv(tmp_path / "events.csv", index=False)
    fs = build_feature_set("events", _data(), FEATURES, tmp_path / "store", tmp_path)
    assert fs.manifest.entity == "customer"

    store = SqliteOnlineStore(tmp_path / "online.db")
    assert materialize(fs, store) == frame["customer"].nunique()
    latest = frame.sort_values("at").groupby("customer").tail(1).set_index("customer")
    asked = ["c3", "nobody", "c17", "c3"]
    got = store.get("events", asked)
    assert got.column("entity").to_pylist() == asked
    assert got.column("spend").to_pylist()[1] is None  # an unknown id: nulls
    for position in (0, 2):
        expected = latest.loc[asked[position]]
        assert got.column("visits")[position].as_py() == expected["visits"]  # whole numbers exact
        assert got.column("spend")[position].as_py() == pytest.approx(expected["spend"], rel=1e-6)
    assert store.version("events") == fs.version and store.version("other") is None

    # A new version replaces the old one's vectors at once.
    frame.assign(visits=frame["visits"] + 1000).to_csv(tmp_path / "events.csv", index=False)
    newer = build_feature_set("events", _data(), FEATURES, tmp_path / "store", tmp_path)
    materialize(newer, store)
    assert store.version("events") == newer.version
    assert store.get("events", ["c3"]).column("visits")[0].as_py() == latest.loc["c3", "visits"] + 1000
    with sqlite3.connect(tmp_path / "online.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"features_events", "materialized"}  # no staging table left
    store.close()


def test_the_cli_materializes_into_the_run_folder_and_refuses_a_version_without_ids(tmp_path: Path) -> None:
    _events().to_csv(tmp_path / "events.csv", index=False)
    store = Workspace.at(tmp_path).feature_store
    fs = build_feature_set("events", _data(), FEATURES, store, tmp_path)
    done = CliRunner().invoke(app, ["features", "materialize", "events", "--runs-dir", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert "materialized 50 entities" in done.output and (tmp_path / "online.db").is_file()
    assert SqliteOnlineStore(tmp_path / "online.db").get("events", ["c1"]).num_rows == 1

    plain = build_feature_set(
        "plain",
        DataConfig(source="events.csv", target="churned", drop=["at", "customer"]),
        FEATURES,
        store,
        tmp_path,
    )
    refused = CliRunner().invoke(app, ["features", "materialize", "plain", "--runs-dir", str(tmp_path)])
    assert refused.exit_code == 2 and "keeps no entity ids: name the id column in data.entity" in " ".join(
        refused.output.split()
    )
    with pytest.raises(UserError, match="holds no feature set 'plain'"):
        SqliteOnlineStore(tmp_path / "online.db").get("plain", ["c1"])
    assert latest_per_entity(fs).num_rows == 50 and plain.manifest.entity is None


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            {"entity": "custmer"},
            "data.entity: column 'custmer' is not in the data (did you mean 'customer'?)",
        ),
        ({"entity": "visits", "features": ["spend", "visits"]}, "column 'visits' is also a feature column"),
    ],
)
def test_an_entity_column_that_cannot_key_rows_is_refused(
    tmp_path: Path, change: dict[str, str], says: str
) -> None:
    _events().to_csv(tmp_path / "events.csv", index=False)
    data = _data().model_copy(update=change)
    with pytest.raises(UserError, match=re.escape(says)):
        build_feature_set("events", data, FEATURES, tmp_path / "store", tmp_path)
    assert not (tmp_path / "store").exists()  # nothing written


def test_a_version_on_object_storage_keeps_its_ids_and_quarantine_and_materializes(
    s3_env: S3Server, tmp_path: Path
) -> None:
    frame = _events()
    frame.loc[5, "spend"] = np.inf  # set aside under quarantine
    frame.to_csv(tmp_path / "events.csv", index=False)
    data = _data().model_copy(update={"validation": ValidationConfig(on_invalid="quarantine")})
    store = s3_env.uri("raylens", "online-from-s3")
    fs = build_feature_set("events", data, FEATURES, store, tmp_path)
    assert not fs.path.local and fs.manifest.quarantined == {"spend: infinite": 1}
    aside = fs.read_quarantined()
    assert aside is not None and aside.num_rows == 1
    online = SqliteOnlineStore(tmp_path / "online.db")
    assert materialize(fs, online) == frame.drop(index=5)["customer"].nunique()
    assert online.get("events", ["c1"]).num_rows == 1
    online.close()
