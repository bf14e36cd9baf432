from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from raylens.errors import UserError
from raylens.features import (
    DataConfig,
    FeaturesConfig,
    build_feature_set,
    list_feature_sets,
    plan_feature_set,
    publish_feature_set,
)

DATA = DataConfig(source="sklearn:wine", target="target")
FEATURES = FeaturesConfig(transforms=[{"standardize": "*"}])


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_plan_writes_nothing_and_publish_stores_exactly_the_plan(tmp_path: Path) -> None:
    pq.write_table(
        pa.table(
            {"a": [float(i) for i in range(40)], "b": list(range(40)), "target": [i % 2 for i in range(40)]}
        ),
        tmp_path / "d.parquet",
    )
    before = tree(tmp_path)
    planned = plan_feature_set("d", DataConfig(source="d.parquet", target="target"), FEATURES, tmp_path)
    assert tree(tmp_path) == before

    store = tmp_path / "store"
    fs = publish_feature_set(planned, store)
    assert fs.version == planned.version
    assert fs.manifest == planned.manifest
    assert planned.manifest.version == planned.version
    assert planned.manifest.rows == {"train": 28, "valid": 6, "test": 6}
    assert [v.version for v in list_feature_sets(store)] == [planned.version]


def test_build_publishes_the_planned_version(tmp_path: Path) -> None:
    planned = plan_feature_set("wine", DATA, FEATURES)
    fs = build_feature_set("wine", DATA, FEATURES, tmp_path)
    assert fs.version == planned.version
    assert fs.manifest.model_copy(update={"created_at": ""}) == planned.manifest.model_copy(
        update={"created_at": ""}
    )


def test_plan_exposes_what_a_caller_checks_before_writing(tmp_path: Path) -> None:
    planned = plan_feature_set("wine", DATA, FEATURES)
    assert planned.name == "wine" and planned.task == "classification"
    assert planned.classes == [0, 1, 2] and planned.num_outputs == 3
    assert planned.feature_columns[0] == "alcohol" and len(planned.feature_columns) == 13
    assert planned.source_fingerprint.startswith("sklearn:wine@scikit-learn-")

    sample = planned.sample(4)
    assert sample.shape == (4, 13) and sample.dtype == np.float32
    assert planned.sample(10_000).shape == (125, 13)
    fs = publish_feature_set(planned, tmp_path)
    assert np.array_equal(sample, fs.read("train").x[:4])

    # What is published cannot drift from what was planned and versioned.
    with pytest.raises(ValidationError, match="frozen"):
        planned.manifest.name = "changed"  # type: ignore[misc]
    sample[:] = 0
    assert planned.name == "wine" and planned.sample(4).any()
    with pytest.raises(ValueError, match="read-only"):
        planned.splits["train"].x[0, 0] = 1.0


def test_plan_refuses_a_name_that_is_not_a_folder_name() -> None:
    with pytest.raises(UserError, match=r"name: '\.\./x' cannot name a feature set; use letters"):
        plan_feature_set("../x", DATA, FEATURES)


def test_an_unchanged_source_reuses_its_stored_version_without_reading_the_rows(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": np.arange(40.0), "b": np.arange(40.0) % 7, "target": np.arange(40) % 2})
    frame.to_csv(tmp_path / "d.csv", index=False)
    data = DataConfig(source="d.csv", target="target")
    store = tmp_path / "store"
    first = publish_feature_set(plan_feature_set("d", data, FEATURES, tmp_path, store), store)
    again = plan_feature_set("d", data, FEATURES, tmp_path, store)
    # Taken from the store: its manifest as stored (a new plan would be stamped now), its rows.
    assert again.manifest == first.manifest and again.manifest.build_key
    assert np.array_equal(again.splits["train"].x, first.read("train").x)
    # Another spec section, or other bytes in the source, plan afresh.
    other = plan_feature_set("d", data, FeaturesConfig(), tmp_path, store)
    assert other.manifest.created_at != first.manifest.created_at
    frame.assign(a=frame["a"] + 1).to_csv(tmp_path / "d.csv", index=False)
    changed = plan_feature_set("d", data, FEATURES, tmp_path, store)
    assert changed.version != first.version and changed.manifest.build_key != first.manifest.build_key
