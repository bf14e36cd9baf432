from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, build_feature_set, list_feature_sets


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": ["x", "y", "z"], "y": [0, 1, 0]}), tmp_path / "d.parquet")
    store = tmp_path / "store"
    with pytest.raises(UserError, match="feature column 'a'"):
        build_feature_set("d", DataConfig(source="d.parquet", target="y"), FeaturesConfig(), store, tmp_path)
    assert list_feature_sets(store) == []
    assert not (store / "d").exists()


def test_regression_keeps_target_statistics(tmp_path: Path) -> None:
    fs = build_feature_set(
        "diabetes", DataConfig(source="sklearn:diabetes", target="target"), FeaturesConfig(), tmp_path
    )
    assert fs.task == "regression" and fs.classes is None and fs.num_outputs == 1
    stats = fs.manifest.target_statistics
    assert stats is not None and 100 < stats.mean < 200 and stats.std > 10
