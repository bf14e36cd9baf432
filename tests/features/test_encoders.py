"""Encodings of source columns: categories and buckets fitted on the training split only, values
training never saw in a bucket of their own, and the same encoding in every process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, build_feature_set, plan_feature_set
from raylens.features.encoders import OTHER, FittedEncoder, encoders_from_dicts, fit_encoders
from raylens.features.online import latest_per_entity
from raylens.features.splits import split_rows


def _steps(*steps: dict[str, object]) -> FeaturesConfig:
    return FeaturesConfig.model_validate({"transforms": list(steps)})


def _customers(rows: int = 240, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "plus", "pro"], rows, p=[0.6, 0.3, 0.1]).astype(object)
    plan[rng.random(rows) < 0.05] = None
    age = rng.normal(40, 12, rows)
    age[rng.random(rows) < 0.1] = np.nan
    return pd.DataFrame(
        {
            "customer": [f"c{i % 60}" for i in range(rows)],
            "plan": plan,
            "region": [f"r{i}" for i in rng.integers(0, 500, rows)],
            "income": rng.exponential(1000, rows),
            "age": age,
            "churned": rng.integers(0, 2, rows),
        }
    )


ENCODED = _steps(
    {"one_hot": {"columns": ["plan"], "max_categories": 2}},
    {"hashing": {"columns": ["region"], "buckets": 8}},
    {"bucketize": {"columns": ["income"], "bins": 4}},
    {"impute": {"columns": ["age"], "strategy": "median", "indicator": True}},
    {"standardize": "*"},
)


def test_each_encoding_is_fitted_on_the_training_rows_and_stored_with_the_version(tmp_path: Path) -> None:
    frame = _customers()
    frame.to_parquet(tmp_path / "c.parquet")
    data = DataConfig(source="c.parquet", target="churned", drop=["customer"], split={"seed": 3})
    planned = plan_feature_set("customers", data, ENCODED, tmp_path)
    manifest = planned.manifest
    assert manifest.input_columns == ["plan", "region", "income", "age"]
    assert manifest.feature_columns == [
        "plan=basic",
        "plan=plus",
        f"plan={OTHER}",
        *(f"region#{i}" for i in range(8)),
        "income",
        "age",
        "age:missing",
    ]
    train = frame.iloc[split_rows(frame["churned"].to_numpy(), data.split, stratify=True).train]
    x = pd.DataFrame(planned.splits["train"].x, columns=manifest.feature_columns)

    # one_hot: the two most frequent plans of the training rows; 'pro' and a missing plan: other.
    assert x["plan=basic"].tolist() == (train["plan"] == "basic").astype(float).tolist()
    assert x[f"plan={OTHER}"].tolist() == (~train["plan"].isin(["basic", "plus"])).astype(float).tolist()
    # hashing: exactly one bucket per row.
    assert (x[[f"region#{i}" for i in range(8)]].sum(axis=1) == 1).all()
    # bucketize: edges are the quartiles of the training rows, so each bucket holds about a quarter.
    (bucketize,) = [e for e in manifest.encoders or [] if e["kind"] == "bucketize"]
    assert bucketize["boundaries"] == pytest.approx(np.quantile(train["income"], [0.25, 0.5, 0.75]))
    assert sorted(x["income"].value_counts().tolist()) == pytest.approx([len(train) / 4] * 4, abs=2)
    # impute with indicator: 1 where age was missing, and the filled column standardized; the
    # encoded columns are no quantities, so "*" left them as they are.
    assert x["age:missing"].tolist() == train["age"].isna().astype(float).tolist()
    assert x["age"].mean() == pytest.approx(0, abs=1e-5)
    assert set(np.unique(x["plan=plus"])) <= {0.0, 1.0}


def test_values_training_never_saw_land_in_the_unknown_bucket() -> None:
    train = pa.table({"plan": ["basic", "plus", "basic", None], "n": [3, 1, 2, 3]})
    fitted = fit_encoders(_steps({"one_hot": ["plan"]}, {"ordinal": ["n"]}), train, ["plan", "n"])
    one_hot, ordinal = fitted
    assert one_hot.categories == ["basic", "plus"] and ordinal.categories == [1, 2, 3]
    later = pa.chunked_array([["plus", "gold", None]])
    assert np.stack(one_hot.encode(later), axis=1).tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert ordinal.encode(pa.chunked_array([[2, 7, None]]))[0].tolist() == [2, 0, 0]
    # Stored as plain data and read back, an encoder encodes the same.
    (again,) = encoders_from_dicts([one_hot.to_dict()])
    assert np.array_equal(np.stack(again.encode(later)), np.stack(one_hot.encode(later)))


def test_a_hashed_value_lands_in_the_same_bucket_in_every_process() -> None:
    hashing = FittedEncoder("hashing", "region", buckets=16)
    values = [f"r{i}" for i in range(50)]
    here = np.argmax(np.stack(hashing.encode(pa.array(values)), axis=1), axis=1).tolist()
    script = (
        "import numpy as np, pyarrow as pa\n"
        "from raylens.features.encoders import FittedEncoder\n"
        f"e = FittedEncoder('hashing', 'region', buckets=16)\n"
        f"print(np.argmax(np.stack(e.encode(pa.array({values!r})), axis=1), axis=1).tolist())\n"
    )
    for seed in ("1", "2"):  # Python's own string hash differs between these two
        there = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        assert eval(there) == here
    assert len(set(here)) > 8, "50 values should spread over most of 16 buckets"


@pytest.mark.parametrize(
    ("steps", "fragments"),
    [
        ([], ["feature column 'plan' has type large_string", "one_hot, ordinal or hashing of [plan]"]),
        ([{"one_hot": ["income"]}], ["one_hot of 'income', a column of decimal numbers", "bucketize it"]),
        (
            [{"bucketize": {"columns": ["plan"], "bins": 3}}],
            ["bucketize of 'plan', a column of large_string"],
        ),
        ([{"ordinal": ["plna"]}], ["ordinal names 'plna', which is not a feature column"]),
        (
            [{"one_hot": ["plan"]}, {"ordinal": ["plan"]}],
            ["'plan' is encoded twice (one_hot and ordinal)"],
        ),
    ],
)
def test_an_encoding_the_columns_cannot_take_is_refused_and_nothing_is_written(
    tmp_path: Path, steps: list[dict[str, object]], fragments: list[str]
) -> None:
    _customers().drop(columns=["region", "age"]).to_parquet(tmp_path / "c.parquet")
    data = DataConfig(source="c.parquet", target="churned", drop=["customer"])
    with pytest.raises(UserError) as refused:
        build_feature_set("c", data, _steps(*steps), tmp_path / "store", tmp_path)
    for fragment in fragments:
        assert fragment in str(refused.value), str(refused.value)
    assert not (tmp_path / "store").exists()


def test_bucketize_settings_are_checked_when_the_spec_is_read() -> None:
    with pytest.raises(ValueError, match=r"bins .* or boundaries, one of them"):
        _steps({"bucketize": {"columns": ["x"]}})
    with pytest.raises(ValueError, match="each above the one before"):
        _steps({"bucketize": {"columns": ["x"], "boundaries": [3, 1]}})
    with pytest.raises(ValueError, match=r"'one_hots' is not a transform \(did you mean 'one_hot'\?\)"):
        _steps({"one_hots": ["x"]})


def test_the_online_store_keeps_the_source_values_of_encoded_columns(tmp_path: Path) -> None:
    frame = _customers()
    frame.to_parquet(tmp_path / "c.parquet")
    data = DataConfig(source="c.parquet", target="churned", entity="customer")
    fs = build_feature_set("customers", data, ENCODED, tmp_path / "store", tmp_path)
    latest = latest_per_entity(fs).to_pandas().set_index("entity")
    expected = frame.groupby("customer").tail(1).set_index("customer")
    assert list(latest.columns) == ["plan", "region", "income", "age"]
    assert latest["plan"].to_dict() == expected["plan"].to_dict()  # None included
    assert latest["region"].to_dict() == expected["region"].to_dict()
    assert latest["income"].to_numpy() == pytest.approx(expected.loc[latest.index, "income"].to_numpy())


def test_a_splits_rows_are_given_back_as_the_source_had_them(tmp_path: Path) -> None:
    """What the quality gate scores models on: the test rows' own values, encoded columns
    included (kept beside the features where the spec names an entity), a missing value imputed
    with an indicator missing again; an encoding that cannot be undone is refused."""
    from raylens.features.drift import raw_rows

    frame = _customers()
    frame.to_parquet(tmp_path / "c.parquet")
    with_entity = DataConfig(source="c.parquet", target="churned", entity="customer", split={"seed": 3})
    fs = build_feature_set("customers", with_entity, ENCODED, tmp_path / "store", tmp_path)
    rows, y = raw_rows(fs, "test")
    source = frame.iloc[fs.read_keys("test").column("__row__").to_numpy()].reset_index(drop=True)
    assert list(rows.columns) == ["plan", "region", "income", "age"]
    assert (
        rows["plan"].tolist() == source["plan"].tolist()
        and rows["region"].tolist() == source["region"].tolist()
    )
    np.testing.assert_allclose(rows["income"], source["income"])  # its own values, not its bucket
    assert rows["age"].isna().tolist() == source["age"].isna().tolist()
    np.testing.assert_allclose(rows["age"].dropna(), source["age"].dropna(), rtol=1e-5)
    assert y.tolist() == source["churned"].tolist()

    imputed_only = _steps({"impute": {"columns": ["age"], "strategy": "median", "indicator": True}})
    numbers = DataConfig(source="c.parquet", target="churned", drop=["customer", "plan", "region"])
    rows, _ = raw_rows(
        build_feature_set("numbers", numbers, imputed_only, tmp_path / "store", tmp_path), "test"
    )
    assert rows["age"].isna().any() and not rows["income"].isna().any()

    no_entity = DataConfig(source="c.parquet", target="churned", drop=["customer"])
    encoded = build_feature_set("anonymous", no_entity, ENCODED, tmp_path / "store", tmp_path)
    with pytest.raises(
        UserError, match=r"encodes column 'plan' and keeps its own values only for .*data.entity"
    ):
        raw_rows(encoded, "test")
