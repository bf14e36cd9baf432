import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raylens.errors import UserError
from raylens.features import (
    DataConfig,
    FeaturesConfig,
    build_feature_set,
    list_feature_sets,
    open_feature_set,
)
from raylens.features import store as store_module

DATA = DataConfig(source="sklearn:wine", target="target")
FEATURES = FeaturesConfig(transforms=[{"standardize": "*"}])


def test_same_input_same_version_and_files_are_reused(tmp_path: Path) -> None:
    first = build_feature_set("wine", DATA, FEATURES, tmp_path)
    again = build_feature_set("wine", DATA, FEATURES, tmp_path)
    assert first.version == again.version
    assert [fs.version for fs in list_feature_sets(tmp_path)] == [first.version]


def test_other_split_or_transform_gives_other_version(tmp_path: Path) -> None:
    base = build_feature_set("wine", DATA, FEATURES, tmp_path)
    reseeded = build_feature_set(
        "wine",
        DATA.model_copy(update={"split": DATA.split.model_copy(update={"seed": 1})}),
        FEATURES,
        tmp_path,
    )
    raw = build_feature_set("wine", DATA, FeaturesConfig(), tmp_path)
    assert len({base.version, reseeded.version, raw.version}) == 3


def test_manifest_describes_the_version(tmp_path: Path) -> None:
    fs = build_feature_set("wine", DATA, FEATURES, tmp_path)
    manifest = fs.manifest
    assert manifest["rows"] == {"train": 125, "valid": 26, "test": 27}
    assert manifest["source"]["fingerprint"].startswith("sklearn:wine@")
    assert set(manifest["statistics"]["alcohol"]) == {"mean", "std", "min", "max"}
    assert manifest["transforms"][0]["kind"] == "standardize"
    assert manifest["schema"]["target"].startswith("int")
    train = fs.read("train")
    # Standardization is fitted on the training split only.
    assert np.allclose(train.x.mean(axis=0), 0, atol=1e-5)
    assert not np.allclose(fs.read("test").x.mean(axis=0), 0, atol=1e-3)


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_write = store_module.pq.write_table

    def failing_write(table, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(table, path, *args, **kwargs)

    monkeypatch.setattr(store_module.pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        build_feature_set("wine", DATA, FEATURES, tmp_path)
    assert list_feature_sets(tmp_path) == []
    assert list((tmp_path / "wine").iterdir()) == []


def test_a_crash_mid_write_leaves_no_readable_version(tmp_path: Path) -> None:
    """The writer process dies (no cleanup runs) after the first split file: readers see no
    version, and the next build publishes a complete one."""
    script = f"""
import os
from pathlib import Path
from raylens.features import store, DataConfig, FeaturesConfig, build_feature_set
real = store.pq.write_table
def dying(table, path, *a, **k):
    real(table, path, *a, **k)
    os._exit(9)
store.pq.write_table = dying
data = DataConfig(source="sklearn:wine", target="target")
build_feature_set("wine", data, FeaturesConfig(), Path({str(tmp_path)!r}))
"""
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert crashed.returncode == 9
    leftovers = list((tmp_path / "wine").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".staging-")
    assert list_feature_sets(tmp_path) == []

    fs = build_feature_set("wine", DATA, FeaturesConfig(), tmp_path)
    assert [v.version for v in list_feature_sets(tmp_path)] == [fs.version]
    assert len(fs.read("test")) == 27


def test_unknown_version_lists_the_stored_ones(tmp_path: Path) -> None:
    fs = build_feature_set("wine", DATA, FEATURES, tmp_path)
    with pytest.raises(UserError, match=f"stored versions: {fs.version}"):
        open_feature_set(tmp_path, "wine", "0000")
