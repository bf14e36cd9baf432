"""`raylens features diff`: schema changes and per-column drift (PSI, Kolmogorov-Smirnov) between two
stored versions, on real feature sets built from CSV files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from raylens.cluster.cli import app
from raylens.cluster.workspace import Workspace
from raylens.features import DataConfig, FeaturesConfig, build_feature_set
from raylens.features.drift import diff_feature_sets, ks_statistic, psi


def test_psi_is_the_sum_over_the_first_samples_deciles_of_the_share_shift_times_its_log_ratio() -> None:
    expected = np.arange(100.0)  # deciles: ten bins of ten rows
    actual = np.concatenate([np.arange(50.0), np.full(50, 95.0)])  # half in the top bin
    shares_a = np.array([0.1] * 5 + [0.5 / 100] * 4 + [0.5])  # an empty bin counts half a row
    manual = float(np.sum((shares_a - 0.1) * np.log(shares_a / 0.1)))
    assert psi(expected, actual) == pytest.approx(manual)
    rng = np.random.default_rng(0)
    same, shifted = rng.normal(size=5000), rng.normal(size=5000)
    assert psi(same, shifted) < 0.02 and psi(same, shifted + 1) > 0.25
    assert ks_statistic(same, same)[0] == 0 and ks_statistic(same, shifted + 1)[1] < 1e-6
    assert psi(np.ones(50), np.ones(50)) == 0 and math.isnan(psi(np.ones(5), np.array([])))


def _table(rows: int, seed: int, shift: float = 0.0, extra: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "steady": rng.normal(size=rows),
            "moving": rng.normal(size=rows) + shift,
            "count": rng.integers(0, 10, rows),
        }
    )
    if extra:
        frame["added"] = rng.normal(size=rows)
    frame["label"] = (frame["steady"] > 0).astype(int)
    return frame


def test_diff_names_the_schema_change_and_the_drifted_column(tmp_path: Path) -> None:
    store = Workspace.at(tmp_path).feature_store
    data = DataConfig(source="d.csv", target="label", features=["steady", "moving", "count"])
    features = FeaturesConfig(transforms=[{"standardize": "*"}])
    _table(2000, 0).to_csv(tmp_path / "d.csv", index=False)
    first = build_feature_set("d", data, features, store, tmp_path)
    _table(2000, 1, shift=2.0, extra=True).to_csv(tmp_path / "d.csv", index=False)
    second = build_feature_set("d", data, features, store, tmp_path)

    diff = diff_feature_sets(first, second)
    assert diff.added == ["added"] and diff.removed == [] and diff.schema_changed
    by_column = {d.column: d for d in diff.drift}
    assert diff.drift[0].column == "moving" and by_column["moving"].verdict == "major"
    assert by_column["steady"].verdict == "stable" and by_column["count"].verdict == "stable"
    assert by_column["moving"].mean_after - by_column["moving"].mean_before == pytest.approx(2, abs=0.15)
    assert any(change.startswith("source: d.csv") for change in diff.changes)

    shown = CliRunner().invoke(
        app,
        ["features", "diff", f"d@{first.version}", second.version, "--runs-dir", str(tmp_path)],
        env={"COLUMNS": "120"},
    )
    assert shown.exit_code == 0, shown.output
    assert "column added: added" in shown.output
    assert any("moving" in line and "major" in line for line in shown.output.splitlines())
    newest = CliRunner().invoke(
        app, ["features", "diff", f"d@{first.version}", "d", "--runs-dir", str(tmp_path)]
    )
    assert newest.exit_code == 0 and f"d@{second.version}" in " ".join(newest.output.split())

    unknown = CliRunner().invoke(app, ["features", "diff", "d@nope", "d", "--runs-dir", str(tmp_path)])
    assert unknown.exit_code == 2 and "has no version 'nope'" in unknown.output
    assert "Traceback" not in unknown.output
