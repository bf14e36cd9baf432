from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, plan_feature_set, sources
from raylens.features.sources import BUNDLED, load_source
from tests.features.conftest import Refuse


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_sets_load_with_a_target_column(name: str) -> None:
    raw = load_source(f"sklearn:{name}")
    assert raw.table.num_rows > 100
    assert "target" in raw.table.column_names
    assert raw.fingerprint.startswith(f"sklearn:{name}@scikit-learn-")


def test_unknown_bundled_set_names_the_choices() -> None:
    with pytest.raises(UserError, match=r"unknown scikit-learn data set 'digit' \(did you mean 'digits'\?\)"):
        load_source("sklearn:digit")


def test_synthetic_source_takes_its_parameters() -> None:
    raw = load_source("synthetic:classification?rows=50&features=3&classes=3&seed=1")
    assert raw.table.num_rows == 50
    assert raw.table.column_names == ["x0", "x1", "x2", "target"]
    with pytest.raises(UserError, match="unknown parameter 'colums'"):
        load_source("synthetic:classification?colums=3")


def test_a_synthetic_source_is_generated_chunk_by_chunk_the_same_rows_at_any_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sources, "SYNTHETIC_CHUNK_ROWS", 64)
    small = load_source("synthetic:classification?rows=100&features=5&classes=4&seed=2").table
    large = load_source("synthetic:classification?rows=250&features=5&classes=4&seed=2").table
    assert large.slice(0, 100).equals(small) and large.num_rows == 250
    assert large.schema.field("x0").type == pa.float32() and large.schema.field("target").type == pa.int64()
    assert sorted(set(large.column("target").to_pylist())) == [0, 1, 2, 3]
    other = load_source("synthetic:classification?rows=100&features=5&classes=4&seed=3").table
    assert not other.equals(small)
    with pytest.raises(UserError, match=r"5 classes need .* 2\*\*informative >= classes"):
        load_source("synthetic:classification?rows=10&features=2&informative=2&classes=5")


def test_parquet_and_csv_files_and_folders(tmp_path: Path) -> None:
    table = pa.table({"a": [1.0, 2.0, 3.0], "target": [0, 1, 0]})
    pq.write_table(table, tmp_path / "one.parquet")
    (tmp_path / "parts").mkdir()
    pq.write_table(table, tmp_path / "parts" / "p0.parquet")
    pq.write_table(table, tmp_path / "parts" / "p1.parquet")
    pacsv.write_csv(table, tmp_path / "one.csv")

    assert load_source("one.parquet", tmp_path).table.num_rows == 3
    assert load_source(str(tmp_path / "parts")).table.num_rows == 6
    csv = load_source("one.csv", tmp_path)
    assert csv.table.num_rows == 3 and csv.fingerprint.startswith("sha256:")


def test_file_fingerprint_follows_content(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,target\n1,0\n2,1\n")
    first = load_source(str(path)).fingerprint
    path.write_text("a,target\n1,0\n3,1\n")
    assert load_source(str(path)).fingerprint != first


def test_missing_and_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_source("nope.parquet", tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"not a \.parquet or \.csv file"):
        load_source(str(tmp_path / "notes.txt"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="cannot read"):
        load_source(str(tmp_path / "bad.parquet"))


IRIS_ROWS = "5.1{d}3.5{d}0\n4.9{d}3.0{d}1\n4.7{d}3.2{d}0\n"


def test_csv_files_that_disagree_on_a_type_name_the_column_files_and_types(
    tmp_path: Path, refuse: Refuse
) -> None:
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "a.csv").write_text("x,target\n1,0\n2,1\n")
    (tmp_path / "parts" / "b.csv").write_text("x,target\nunknown,0\n3,1\n")
    refuse(
        "parts",
        "disagree on the type of column 'x': int64 in 'a.csv' but string in 'b.csv'",
        "same kind of values in every file",
    )


def test_integer_and_decimal_files_combine(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x,target\n1,0\n2,1\n")
    (tmp_path / "b.csv").write_text("x,target\n1.5,0\n,1\n")
    table = load_source(str(tmp_path)).table
    assert table.schema.field("x").type == pa.float64() and table.num_rows == 4


def test_truncated_or_corrupt_parquet_names_the_file(tmp_path: Path, refuse: Refuse) -> None:
    table = pa.table({"a": [float(i) for i in range(200)], "target": [i % 2 for i in range(200)]})
    (tmp_path / "parts").mkdir()
    pq.write_table(table, tmp_path / "parts" / "p0.parquet")
    data = (tmp_path / "parts" / "p0.parquet").read_bytes()
    corrupt = bytearray(data)
    corrupt[10:200] = b"\0" * 190  # the first data page: the footer still parses
    (tmp_path / "parts" / "p1.parquet").write_bytes(bytes(corrupt))
    refuse("parts", "cannot read Parquet file 'p1.parquet'", "truncated or corrupt")
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    refuse("cut.parquet", f"cannot read Parquet file '{tmp_path / 'cut.parquet'}'", "write it again")


def test_any_arrow_error_while_reading_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pq.write_table(pa.table({"a": [1.0], "target": [0]}), tmp_path / "d.parquet")

    def not_implemented(*args: object, **kwargs: object) -> pa.Table:
        raise pa.ArrowNotImplementedError("unsupported encoding")

    monkeypatch.setattr(sources.pq.ParquetFile, "iter_batches", not_implemented)
    with pytest.raises(UserError, match=r"cannot read Parquet file .*d\.parquet.*unsupported encoding"):
        load_source(str(tmp_path / "d.parquet"))


@pytest.mark.parametrize(
    "content",
    [
        "name,a,target\ncafé,1,0\nthé,2,1\n",  # in the rows: Arrow reads the column as bytes
        "namé,a,target\nx,1,0\ny,2,1\n",  # in the header: Python fails to decode it
    ],
)
def test_non_utf8_csv_says_to_save_it_as_utf8(tmp_path: Path, refuse: Refuse, content: str) -> None:
    (tmp_path / "d.csv").write_bytes(content.encode("latin-1"))
    refuse("d.csv", f"CSV file '{tmp_path / 'd.csv'}' is not UTF-8 text", "save it again with UTF-8 encoding")


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("a;b;target\n" + IRIS_ROWS.format(d=";"), "';'"),
        ("a\tb\ttarget\n" + IRIS_ROWS.format(d="\t"), "tab"),
        # Decimal commas: the rows split on ',' into more columns than the header has.
        ("a;b;target\n" + IRIS_ROWS.format(d=";").replace(".", ","), "';'"),
    ],
)
def test_other_delimiters_are_named(tmp_path: Path, refuse: Refuse, content: str, named: str) -> None:
    (tmp_path / "d.csv").write_text(content)
    refuse("d.csv", f"seems to use {named} as its delimiter", "raylens reads comma-separated CSV")


def test_equivalent_paths_give_one_uri_and_one_version(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "d.csv").write_text("a,target\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    plans = [
        plan_feature_set("d", DataConfig(source=source, target="target"), FeaturesConfig(), tmp_path)
        for source in ("d.csv", "./d.csv", "a/../d.csv")
    ]
    assert {p.manifest.source.uri for p in plans} == {"d.csv"}
    assert len({p.version for p in plans}) == 1


def test_a_folder_of_csv_files_is_one_table_and_each_file_counts_in_the_fingerprint(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.csv").write_text("x,count,target\n0.5,1,0\n1.5,2,1\n")
    (parts / "b.csv").write_text("x,count,target\n2.5,3,1\n")
    raw = load_source("parts", tmp_path)
    assert raw.table.num_rows == 3
    assert (
        raw.table.column("count").to_pylist() == [1, 2, 3]
        and raw.table.schema.field("count").type == pa.int64()
    )
    before = raw.fingerprint
    (parts / "b.csv").write_text("x,count,target\n2.5,4,1\n")
    assert load_source("parts", tmp_path).fingerprint != before


@pytest.mark.parametrize(
    ("target_values", "task", "classes"),
    [(["0", "1", "1", "0"], "classification", [0, 1]), (["0.5", "1.25", "1", "0"], "regression", None)],
)
def test_the_target_columns_type_in_the_csv_decides_the_task(
    tmp_path: Path, target_values: list[str], task: str, classes: list[int] | None
) -> None:
    rows = 40
    lines = ["x,y"] + [f"{i / rows},{target_values[i % 4]}" for i in range(rows)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    plan = plan_feature_set("d", DataConfig(source="d.csv", target="y"), FeaturesConfig(), tmp_path)
    assert plan.manifest.task == task
    assert plan.manifest.classes == classes


def test_house_prices_in_whole_dollars_are_a_regression_and_forced_classes_fail_briefly(
    tmp_path: Path, refuse: Refuse
) -> None:
    """The user's CSV: 2000 houses priced in whole dollars. Taken for classes, a split cannot be
    stratified: the message says so in a line, with the fix, not 2000 class names."""
    lines = ["rooms,age,price"] + [f"{1 + i % 5},{i % 50},{150_000 + 37 * i}" for i in range(2000)]
    (tmp_path / "houses.csv").write_text("\n".join(lines) + "\n")
    plan = plan_feature_set(
        "houses", DataConfig(source="houses.csv", target="price"), FeaturesConfig(), tmp_path
    )
    assert plan.manifest.task == "regression"
    assert "2000 distinct whole numbers" in plan.manifest.task_decision

    message = refuse(
        "houses.csv",
        "cannot stratify 2000 rows by class",
        "data.task: regression",
        target="price",
        task="classification",
    )
    assert (
        "2000 of its 2000 classes have a single row (150000, 150037, 150074, 150111, 150148, ...)" in message
    )
    assert len(message) < 400, message
