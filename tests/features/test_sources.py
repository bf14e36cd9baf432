from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from raylens.errors import UserError
from raylens.features.sources import BUNDLED, load_source


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
