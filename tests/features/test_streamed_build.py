"""A build reads its source in batches: whatever the batch size, and whether the splits are held
in memory or in temporary files, it gives the same version; and it never holds the source's rows
together."""

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylens.errors import UserError
from raylens.features import (
    DataConfig,
    FeaturesConfig,
    build_feature_set,
    pipeline,
    plan_feature_set,
    sources,
)
from raylens.features.pipeline import PlannedFeatureSet

ROWS = 3000


def _table(rows: int = ROWS) -> pa.Table:
    rng = np.random.default_rng(7)
    age = rng.normal(40, 12, rows)
    age[rng.random(rows) < 0.05] = np.nan
    income = rng.lognormal(3, 1, rows)
    income[[11, 2500]] = np.inf
    return pa.table(
        {
            "id": [f"c{i % 900}" for i in range(rows)],
            "when": pa.array(np.arange(rows) // 3, pa.int64()),
            "color": rng.choice(["red", "blue", "green", "teal"], rows),
            "age": age,
            "income": income,
            "k": rng.integers(0, 5, rows),
            "label": np.where(rng.random(rows) < 0.4, "yes", "no"),
            "y": rng.normal(size=rows),
        }
    )


def _late_decimals_csv(path: Path) -> None:
    """A CSV file whose column ``z`` holds whole numbers for well past Arrow's first block (1 MB),
    then decimals: a whole-file read makes it double, a read of the first block int64."""
    with path.open("w") as out:
        out.write("z,u,target\n")
        for i in range(160_000):
            z = f"{i % 7}.5" if i >= 150_000 and i % 3 == 0 else str(i % 7)
            out.write(f"{z},{i % 1000},{i % 2}\n")


SPECS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "quarantine, entity, one-hot, imputed with indicator": (
        {
            "source": "t.parquet",
            "target": "label",
            "entity": "id",
            "drop": ["when", "y"],
            "validation": {"columns": {"k": {"max": 3}}, "on_invalid": "quarantine"},
        },
        {
            "transforms": [
                {"one_hot": ["color"]},
                {"impute": {"columns": ["age"], "strategy": "median", "indicator": True}},
                {"standardize": "*"},
            ]
        },
    ),
    "split by time, regression, ordinal and buckets": (
        {
            "source": "t.parquet",
            "target": "y",
            "entity": "id",
            "drop": ["label"],
            "split": {"time": "when"},
            "validation": {"on_invalid": "quarantine"},
        },
        {
            "transforms": [
                {"ordinal": ["color"]},
                {"bucketize": {"columns": ["k"], "bins": 3}},
                {"impute": {"columns": ["age"], "strategy": "mean"}},
                {"min_max": "*"},
            ]
        },
    ),
    "split by group, a repeated id set aside": (
        {
            "source": "t.parquet",
            "target": "label",
            "drop": ["when", "income", "id"],
            "split": {"group": "id"},
            "validation": {"columns": {"y": {"min": -2.5}}, "on_invalid": "quarantine"},
        },
        {"transforms": [{"hashing": {"columns": ["color"], "buckets": 8}}, {"standardize": "*"}]},
    ),
    "a folder whose files disagree on int and float": (
        {"source": "parts", "target": "label", "drop": ["id", "income", "age", "color"]},
        {"transforms": [{"standardize": "*"}]},
    ),
    "a CSV file whose decimals start after its first block": (
        {"source": "late.csv", "target": "target"},
        {"transforms": [{"standardize": "*"}]},
    ),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sources")
    table = _table()
    pq.write_table(table, folder / "t.parquet", row_group_size=700)
    (folder / "parts").mkdir()
    k = table["k"].to_numpy()
    pq.write_table(
        table.slice(0, 1000).set_column(5, "k", pa.array(k[:1000].astype(float))),
        folder / "parts" / "a.parquet",
    )
    pq.write_table(table.slice(1000), folder / "parts" / "b.parquet")
    _late_decimals_csv(folder / "late.csv")
    return folder


def _same_plans(one: PlannedFeatureSet, other: PlannedFeatureSet) -> None:
    assert other.version == one.version
    assert other.manifest.model_copy(update={"created_at": ""}) == one.manifest.model_copy(
        update={"created_at": ""}
    )
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(other.splits[split].x, one.splits[split].x)
        np.testing.assert_array_equal(other.splits[split].y, one.splits[split].y)
    if one.quarantined is None:
        assert other.quarantined is None
    else:
        assert other.quarantined is not None and other.quarantined.schema.equals(one.quarantined.schema)
        # (pandas' equality: a NaN in the same place is equal)
        assert other.quarantined.to_pandas().equals(one.quarantined.to_pandas())


@pytest.mark.parametrize("spec", list(SPECS))
def test_small_batches_and_splits_in_files_give_the_version_of_one_batch_in_memory(
    spec: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, features = DataConfig(**SPECS[spec][0]), FeaturesConfig(**SPECS[spec][1])
    whole = plan_feature_set("s", data, features, data_dir, batch_rows=10**9)
    assert not isinstance(whole.splits["train"].x, np.memmap)
    monkeypatch.setattr(pipeline, "SPILL_BYTES", 0)
    batched = plan_feature_set("s", data, features, data_dir, batch_rows=37)
    assert all(isinstance(batched.splits[split].x, np.memmap) for split in ("train", "valid", "test"))
    _same_plans(whole, batched)


def test_a_csv_files_types_are_the_whole_files_even_when_its_first_block_says_otherwise(
    data_dir: Path,
) -> None:
    stream = sources.open_source("late.csv", data_dir)
    assert stream.schema.field("z").type == pa.int64()  # what the first block shows
    with pytest.raises(sources.WiderTypes):
        for _ in stream.batches(50_000):
            pass
    widened = stream.widened()
    assert widened.schema.field("z").type == pa.float64()
    assert sum(batch.num_rows for batch in widened.batches(50_000)) == 160_000
    planned = plan_feature_set(
        "late", DataConfig(source="late.csv", target="target"), FeaturesConfig(), data_dir
    )
    assert planned.manifest.raw_schema["z"] == "double"
    assert sum(planned.manifest.rows.values()) == 160_000


def test_the_build_holds_a_batch_of_the_source_never_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, columns = 200_000, 16
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, columns))
    table = pa.table({**{f"x{i}": x[:, i] for i in range(columns)}, "target": (x[:, 0] > 0).astype(np.int64)})
    source_bytes = table.nbytes
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=10_000)
    del table, x
    held: list[int] = []
    real = sources.stream_batches

    def measured(*args: Any, **kwargs: Any) -> Iterator[pa.RecordBatch]:
        for batch in real(*args, **kwargs):
            held.append(pa.total_allocated_bytes())  # Arrow's live buffers, this batch's among them
            yield batch

    monkeypatch.setattr(sources, "stream_batches", measured)
    planned = plan_feature_set(
        "big",
        DataConfig(source="big.parquet", target="target"),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        tmp_path,
        batch_rows=10_000,
    )
    assert sum(planned.manifest.rows.values()) == rows
    assert len(held) == 2 * rows // 10_000  # two passes
    first, second = held[: len(held) // 2], held[len(held) // 2 :]
    batch_bytes = source_bytes // (rows // 10_000)
    # Arrow's live memory grows, over the first pass, by the target column it keeps for the split
    # (8 bytes a row), and over the second not at all (but for the next batch, read while the
    # last is in use); it never nears the source's 27 MB.
    assert max(first) - first[0] <= rows * 8 + 2 * batch_bytes, first
    assert max(second) - second[0] <= 2 * batch_bytes, second
    assert max(held) < source_bytes / 2, (max(held), source_bytes)


def test_a_build_tells_each_pass_its_rows_and_of_how_many(data_dir: Path) -> None:
    told: list[tuple[str, int, int | None]] = []
    planned = plan_feature_set(
        "t",
        DataConfig(**SPECS["quarantine, entity, one-hot, imputed with indicator"][0]),
        FeaturesConfig(**SPECS["quarantine, entity, one-hot, imputed with indicator"][1]),
        data_dir,
        batch_rows=1000,
        rows_done=lambda what, done, total: told.append((what, done, total)),
    )
    # The second pass reads the source again, quarantined rows and all: its rows are the source's.
    assert told == [
        *((pipeline.CHECKING, done, ROWS) for done in (1000, 2000, 3000)),
        *((pipeline.ENCODING, done, ROWS) for done in (1000, 2000, 3000)),
    ]
    assert sum(planned.manifest.rows.values()) < ROWS  # some were set aside
    told.clear()
    plan_feature_set(
        "late",
        DataConfig(source="late.csv", target="target"),
        FeaturesConfig(),
        data_dir,
        rows_done=lambda *a: told.append(a),
    )
    # A CSV file's rows are known once read: the first pass says how many it has read, of no total.
    assert {total for what, _, total in told if what == pipeline.CHECKING} == {None}
    assert told[-1] == (pipeline.ENCODING, 160_000, 160_000)


def test_no_room_for_a_split_on_disk_is_said_and_the_store_left_as_it_was(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.os, "posix_fallocate", full)
    monkeypatch.setattr(pipeline, "SPILL_BYTES", 0)
    store = tmp_path / "store"
    with pytest.raises(UserError, match=r"no room for a split's .* MiB of features .*No space left.*TMPDIR"):
        build_feature_set(
            "t", DataConfig(source="late.csv", target="target"), FeaturesConfig(), store, data_dir
        )
    assert not store.exists()
