import numpy as np
import pyarrow as pa
import pytest

from raylens.errors import UserError
from raylens.features import DataConfig
from raylens.features.prepare import prepare


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
