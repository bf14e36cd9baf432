from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylens.errors import UserError
from raylens.features import DataConfig
from raylens.features.prepare import prepare
from tests.features.conftest import Refuse


def config(**kwargs: object) -> DataConfig:
    return DataConfig(source="test", target=kwargs.pop("target", "y"), **kwargs)  # type: ignore[arg-type]


def test_classification_target_is_encoded_and_classes_kept() -> None:
    table = pa.table({"a": [1.0, 2.0, 3.0, 4.0], "y": ["cat", "dog", "cat", "dog"]})
    prepared = prepare(table, config())
    assert prepared.task == "classification"
    assert prepared.classes == ["cat", "dog"]
    assert prepared.y.tolist() == [0, 1, 0, 1]
    assert prepared.x.dtype == np.float32 and prepared.feature_columns == ["a"]


def test_float_target_is_regression_unless_told() -> None:
    table = pa.table({"a": [1, 2, 3], "y": [0.5, 1.5, 2.5]})
    assert prepare(table, config()).task == "regression"
    assert prepare(pa.table({"a": [1, 2, 3], "y": [0.0, 1.0, 0.0]}), config(task="classification")).task == (
        "classification"
    )


def test_features_select_the_columns_and_task_overrides_what_the_target_suggests() -> None:
    table = pa.table(
        {"a": [1.0, 2.0, 3.0, 4.0], "b": [0, 1, 0, 1], "c": [9.0, 8.0, 7.0, 6.0], "y": [1, 2, 3, 4]}
    )
    assert prepare(table, config()).feature_columns == ["a", "b", "c"]
    assert prepare(table, config(features=["c", "a"])).feature_columns == ["c", "a"]
    assert prepare(table, config(drop=["b"])).feature_columns == ["a", "c"]
    assert prepare(table, config()).task == "classification"  # integers: classes
    regression = prepare(table, config(task="regression"))
    assert regression.task == "regression" and regression.y.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_missing_target_names_the_columns() -> None:
    table = pa.table({"a": [1.0], "label": [1]})
    with pytest.raises(
        UserError,
        match=r"column 'labels' is not in the data \(did you mean 'label'\?\); columns are: a, label",
    ):
        prepare(table, config(target="labels"))


def test_non_numeric_feature_says_how_to_drop_it() -> None:
    table = pa.table({"name": ["x", "y"], "a": [1.0, 2.0], "y": [0, 1]})
    with pytest.raises(UserError, match=r"feature column 'name' has type string.*data\.drop: \[name\]"):
        prepare(table, config())
    assert prepare(table, config(drop=["name"])).feature_columns == ["a"]


def test_empty_data_and_missing_values_are_refused() -> None:
    with pytest.raises(UserError, match="has no rows"):
        prepare(pa.table({"a": pa.array([], pa.float64()), "y": pa.array([], pa.int64())}), config())
    with pytest.raises(UserError, match="'a' has 1 missing values"):
        prepare(pa.table({"a": [1.0, float("nan")], "y": [0, 1]}), config())
    with pytest.raises(UserError, match="single class"):
        prepare(pa.table({"a": [1.0, 2.0], "y": [1, 1]}), config())


def test_infinite_feature_values_are_refused(tmp_path: Path, refuse: Refuse) -> None:
    (tmp_path / "d.csv").write_text("a,b,target\n1,1,0\ninf,2,1\n-inf,3,0\n2,4,1\n")
    refuse("d.csv", "feature column 'a' has 2 rows that are infinite (inf or -inf)", "data.drop: [a]")


def test_nan_or_infinite_float_target_is_refused(tmp_path: Path, refuse: Refuse) -> None:
    rows = {"a": [1.0, 2.0, 3.0, 4.0, 5.0]}
    pq.write_table(
        pa.table({**rows, "target": [1.0, float("nan"), 2.0, float("nan"), 3.0]}), tmp_path / "n.parquet"
    )
    refuse("n.parquet", "data.target: column 'target' has 2 missing values (null or NaN); drop those rows")
    pq.write_table(pa.table({**rows, "target": [1.0, float("inf"), 2.0, 0.5, 3.0]}), tmp_path / "i.parquet")
    refuse("i.parquet", "data.target: column 'target' has 1 rows that are infinite", "drop those rows")


def test_duplicate_column_names_are_refused(tmp_path: Path, refuse: Refuse) -> None:
    (tmp_path / "d.csv").write_text("x,x,y,y,target\n1,2,3,4,0\n5,6,7,8,1\n")
    refuse("d.csv", "has more than one column named 'x', 'y'", "rename the columns so each name is unique")
    table = pa.Table.from_arrays([pa.array([1, 2]), pa.array([3, 4]), pa.array([0, 1])], ["a", "a", "y"])
    with pytest.raises(UserError, match="more than one column named 'a'"):
        prepare(table, config())


def test_a_feature_named_like_the_stored_target_is_refused() -> None:
    table = pa.table({"__target__": [1.0, 2.0], "a": [1.0, 2.0], "y": [0, 1]})
    with pytest.raises(UserError, match=r"'__target__' is a name raylens keeps.*data\.drop: \[__target__\]"):
        prepare(table, config())


def test_whole_numbers_are_classes_up_to_a_limit_and_the_decision_is_said() -> None:
    from raylens.features.prepare import MAX_INFERRED_CLASSES

    few = prepare(pa.table({"a": [1.0] * 40, "y": [i % 3 for i in range(40)]}), config())
    assert few.task == "classification" and "3 distinct whole numbers" in few.task_decision
    many = MAX_INFERRED_CLASSES + 1
    prices = prepare(
        pa.table({"a": [1.0] * 40, "y": [100_000 + 500 * (i % many) for i in range(40)]}), config()
    )
    assert prices.task == "regression"
    assert (
        f"{many} distinct whole numbers" in prices.task_decision
        and "data.task: classification" in prices.task_decision
    )
    told = prepare(pa.table({"a": [1.0] * 40, "y": [i % 3 for i in range(40)]}), config(task="regression"))
    assert told.task == "regression" and told.task_decision == "regression, as data.task says"
