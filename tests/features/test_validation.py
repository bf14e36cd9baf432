"""Data validation: rules per column fail the build naming the column, rule and rows, or set the
rows that break them aside (quarantine) into the version's side table, counted in its manifest;
either way a refused build writes nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from raylens.cluster.cli import app
from raylens.cluster.workspace import Workspace
from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, build_feature_set
from raylens.features.config import ValidationConfig
from raylens.features.validation import REASON


def _patients(rows: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "id": np.arange(rows),
            "age": rng.integers(18, 90, rows).astype(float),
            "ward": rng.choice(["a", "b", "c"], rows),
            "dose": rng.normal(5, 1, rows),
            "outcome": rng.integers(0, 2, rows),
        }
    )
    frame.loc[3, "age"] = 130.0  # out of range
    frame.loc[7, "age"] = np.nan  # missing
    frame.loc[11, "dose"] = np.inf  # infinite feature
    frame.loc[15, "id"] = 14  # a repeated id
    frame.loc[19, "ward"] = "z"  # not an allowed category
    return frame


RULES = {
    "age": {"type": "number", "min": 0, "max": 120},
    "ward": {"allowed": ["a", "b", "c"]},
    "id": {"unique": True},
}


def _data(on_invalid: str = "fail", rules: dict[str, Any] | None = None) -> DataConfig:
    return DataConfig(
        source="patients.csv",
        target="outcome",
        drop=["ward"],
        entity="id",
        validation=ValidationConfig(columns=rules if rules is not None else RULES, on_invalid=on_invalid),
    )


def test_a_broken_rule_fails_the_build_naming_column_rule_and_rows_and_writes_nothing(tmp_path: Path) -> None:
    _patients().to_csv(tmp_path / "patients.csv", index=False)
    with pytest.raises(UserError) as refused:
        build_feature_set("patients", _data(), FeaturesConfig(), tmp_path / "store", tmp_path)
    said = str(refused.value)
    assert said.startswith("data.validation: column 'age' has 1 rows null or NaN (rows 7)"), said
    assert "data.validation.on_invalid: quarantine" in said
    assert not (tmp_path / "store").exists()


def test_quarantine_sets_the_broken_rows_aside_with_their_reasons(tmp_path: Path) -> None:
    frame = _patients()
    frame.to_csv(tmp_path / "patients.csv", index=False)
    fs = build_feature_set("patients", _data("quarantine"), FeaturesConfig(), tmp_path / "store", tmp_path)
    assert fs.manifest.quarantined == {
        "age: null or NaN": 1,
        "age: above 120": 1,
        "ward: not one of a, b, c": 1,
        "id: a repeated value": 1,
        "dose: infinite": 1,
    }
    assert sum(fs.manifest.rows.values()) == len(frame) - 5
    aside = fs.read_quarantined()
    assert aside is not None
    reasons = dict(zip(aside.column("id").to_pylist(), aside.column(REASON).to_pylist(), strict=True))
    assert reasons == {
        7: "age: null or NaN",
        3: "age: above 120",
        19: "ward: not one of a, b, c",
        14: "id: a repeated value",  # the second row of id 14 (row 15)
        11: "dose: infinite",
    }
    runs = Workspace.at(tmp_path / "runs")
    build_feature_set("patients", _data("quarantine"), FeaturesConfig(), runs.feature_store, tmp_path)
    shown = CliRunner().invoke(
        app, ["features", "show", "patients", "--runs-dir", str(tmp_path / "runs")], env={"COLUMNS": "200"}
    )
    assert shown.exit_code == 0, shown.output
    said = " ".join(shown.output.split())
    assert "5 rows set aside by data validation (age: above 120: 1;" in said and "quarantine.parquet" in said


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ({"ward": {"type": "number"}}, "column 'ward' has type string, not number as the spec declares"),
        ({"weight": {"min": 0}}, "data.validation.columns: column 'weight' is not in the data"),
    ],
)
def test_a_rule_the_source_cannot_meet_in_kind_is_refused_even_under_quarantine(
    tmp_path: Path, rules: dict[str, Any], says: str
) -> None:
    _patients().to_csv(tmp_path / "patients.csv", index=False)
    with pytest.raises(UserError, match=re.escape(says)):
        build_feature_set(
            "patients", _data("quarantine", rules), FeaturesConfig(), tmp_path / "store", tmp_path
        )
    assert not (tmp_path / "store").exists()


def test_rules_are_checked_when_the_spec_is_read() -> None:
    with pytest.raises(ValueError, match="min \\(5\\) must not be above max \\(1\\)"):
        ValidationConfig(columns={"age": {"min": 5, "max": 1}})
    with pytest.raises(ValueError, match="fail"):
        ValidationConfig(on_invalid="drop")  # type: ignore[arg-type]


def test_a_run_on_a_quarantined_version_keeps_the_report_in_mlflow(tmp_path: Path) -> None:
    from raylens.storage import Location
    from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob
    from raylens.trainer.run import train_and_record
    from raylens.trainer.tracking import MlflowTracker

    _patients().to_csv(tmp_path / "patients.csv", index=False)
    fs = build_feature_set("patients", _data("quarantine"), FeaturesConfig(), tmp_path / "store", tmp_path)
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "quarantine", tmp_path / "artifacts")
    job = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [8]}), TrainConfig(epochs=1, debug=None), fs
    )
    started: list[str] = []
    train_and_record(
        job,
        fs,
        tracker=tracker,
        run_name="final",
        storage_path=Location.of(tmp_path / "ray"),
        params={},
        tags={},
        on_run_started=started.append,
        embedded=True,
    )
    run = tracker.client.get_run(started[0])
    assert run.data.tags["raylens.data.quarantined_rows"] == "5"
    names = {f.path for f in tracker.client.list_artifacts(started[0], "feature_set")}
    assert "feature_set/quarantined.json" in names
