import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylens.errors import UserError
from raylens.features import (
    DataConfig,
    FeaturesConfig,
    build_feature_set,
    list_feature_sets,
    open_feature_set,
    plan_feature_set,
    publish_feature_set,
)
from raylens.features import store as store_module
from raylens.storage import Location
from tests.servers import S3Server

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
    assert manifest.rows == {"train": 125, "valid": 26, "test": 27}
    assert manifest.source.fingerprint.startswith("sklearn:wine@")
    assert manifest.statistics["alcohol"].std > 0
    assert manifest.transforms[0]["kind"] == "standardize"
    assert manifest.raw_schema["target"].startswith("int")
    # The raw sample: the first training rows as the source has them (the input example).
    assert len(manifest.sample) == 5 and set(manifest.sample[0]) == set(fs.feature_columns)
    train = fs.read("train")
    # Standardization is fitted on the training split only.
    assert np.allclose(train.x.mean(axis=0), 0, atol=1e-5)
    assert not np.allclose(fs.read("test").x.mean(axis=0), 0, atol=1e-3)


def test_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_write = store_module._write_split

    def failing_write(arrays, columns, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 2:  # the second split: the first is written, in staging
            raise OSError("disk full")
        return real_write(arrays, columns, path, *args, **kwargs)

    monkeypatch.setattr(store_module, "_write_split", failing_write)
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
real = store._write_split
def dying(arrays, columns, path, *a, **k):
    real(arrays, columns, path, *a, **k)
    os._exit(9)
store._write_split = dying
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
    # The dead writer's staging folder (this host, its pid gone) was removed by the next writer.
    assert [p.name for p in (tmp_path / "wine").iterdir()] == [fs.version]


def test_unknown_version_lists_the_stored_ones(tmp_path: Path) -> None:
    fs = build_feature_set("wine", DATA, FEATURES, tmp_path)
    with pytest.raises(UserError, match=f"stored versions: {fs.version}"):
        open_feature_set(tmp_path, "wine", "0000")


def test_only_this_hosts_dead_writers_staging_is_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    host = store_module._host()
    folder = tmp_path / "wine"
    names = {
        "dead_here": f".staging-{host}-{dead_pid}-0123456789abcdef-00000000",
        "alive_here": f".staging-{host}-{os.getppid()}-0123456789abcdef-00000001",
        "other_host": f".staging-elsewhere-{dead_pid}-0123456789abcdef-00000002",
        "old_style": ".staging-0123456789abcdef-00000003",
    }
    for name in names.values():
        (folder / name).mkdir(parents=True)
        (folder / name / "train.parquet").write_text("partial")
    fs = build_feature_set("wine", DATA, FEATURES, tmp_path)
    left = {p.name for p in folder.iterdir()}
    assert left == {fs.version, names["alive_here"], names["other_host"], names["old_style"]}


def test_a_version_folder_without_manifest_is_replaced(tmp_path: Path) -> None:
    planned = plan_feature_set("wine", DATA, FEATURES)
    broken = tmp_path / "wine" / planned.version
    broken.mkdir(parents=True)
    (broken / "train.parquet").write_text("half a copy")
    assert list_feature_sets(tmp_path) == []
    fs = publish_feature_set(planned, tmp_path)
    assert fs.path.local_path == broken and fs.manifest == planned.manifest
    assert sorted(p.name for p in broken.iterdir()) == [
        "manifest.json",
        "test.parquet",
        "train.parquet",
        "valid.parquet",
    ]
    assert len(fs.read("train")) == 125
    assert [v.version for v in list_feature_sets(tmp_path)] == [fs.version]


def test_the_publishing_rename_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planned = plan_feature_set("wine", DATA, FEATURES)
    target = tmp_path / "wine" / planned.version
    synced: list[tuple[Path, bool]] = []
    real_fsync = store_module._fsync

    def recording_fsync(path: Path) -> None:
        synced.append((path, target.exists()))
        real_fsync(path)

    monkeypatch.setattr(store_module, "_fsync", recording_fsync)
    publish_feature_set(planned, tmp_path)
    assert synced[-1] == (tmp_path / "wine", True)


def test_listing_skips_what_is_not_a_published_version(tmp_path: Path) -> None:
    fs = build_feature_set("wine", DATA, FEATURES, tmp_path)
    (tmp_path / "wine" / "no-manifest").mkdir()
    (tmp_path / "wine" / "bad-manifest").mkdir()
    (tmp_path / "wine" / "bad-manifest" / "manifest.json").write_text("{not json")
    (tmp_path / "wine" / "stray-file").write_text("x")
    (tmp_path / "stray-file").write_text("x")
    assert [v.version for v in list_feature_sets(tmp_path)] == [fs.version]
    assert [v.version for v in list_feature_sets(tmp_path, "wine")] == [fs.version]
    assert list_feature_sets(tmp_path / "stray-file") == []
    with pytest.raises(UserError, match=r"bad-manifest.*is not a readable manifest; remove the folder"):
        open_feature_set(tmp_path, "wine", "bad-manifest")


def test_on_object_storage_a_version_is_published_by_its_manifest_and_reads_back_the_same(
    s3_env: S3Server, tmp_path: Path
) -> None:
    store = s3_env.uri("raylens", "object-store")
    planned = plan_feature_set("wine", DATA, FEATURES)
    version = Location.of(store) / "wine" / planned.version
    # What a writer that crashed before its manifest leaves: readers skip it, the next write replaces it.
    (version / "train.parquet").write_text("half a copy")
    assert list_feature_sets(store) == []

    stored = publish_feature_set(planned, store)
    assert not stored.path.local and stored.path.uri.startswith("s3://raylens/object-store/wine/")
    local = publish_feature_set(planned, tmp_path)
    for split in ("train", "valid", "test"):
        remote_split, local_split = stored.read(split), local.read(split)
        assert np.array_equal(remote_split.x, local_split.x) and np.array_equal(remote_split.y, local_split.y)
    assert [fs.version for fs in list_feature_sets(store)] == [planned.version]
    assert open_feature_set(store, "wine", planned.version).manifest == local.manifest
    file = version / "train.parquet"
    assert pq.read_table(file.path, filesystem=file.filesystem).num_rows == 125
    # Publishing again writes nothing: the stored version is returned as it is.
    assert publish_feature_set(planned, store).manifest == stored.manifest
    with pytest.raises(UserError, match=f"stored versions: {planned.version}"):
        open_feature_set(store, "wine", "0000")


def test_credentials_in_a_storage_uri_are_refused_naming_the_environment_variables() -> None:
    for uri in (
        "s3://bucket/runs?region=eu-west-1&secret_key=hunter2",
        "s3://AKIA:hunter2@bucket/runs",
        "abfs://account@container/runs?client_secret=hunter2&tenant_id=t",
    ):
        with pytest.raises(UserError, match="AWS_ACCESS_KEY_ID") as refused:
            Location.of(uri)
        assert "hunter2" not in str(refused.value)
