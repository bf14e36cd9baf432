"""Feature transforms: each fitted on the training split only, applied in order, stored as plain
data and applied the same way by the registered model (missing values filled where an impute
step says so, refused elsewhere)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, plan_feature_set
from raylens.features.transforms import apply_all, fit_all, invert_all, transforms_from_dicts
from raylens.trainer.artifacts import feature_matrix

COLUMNS = ["count", "amount", "score"]


def _steps(*steps: dict[str, object]) -> FeaturesConfig:
    return FeaturesConfig(transforms=list(steps))  # type: ignore[arg-type]


def test_each_transform_does_its_arithmetic_fitted_on_the_rows_given() -> None:
    x = np.array([[0.0, 10.0, -5.0], [9.0, np.nan, 5.0], [99.0, 30.0, 50.0]])
    steps = _steps(
        {"impute": {"columns": ["amount"], "strategy": "median"}},
        {"log1p": ["count"]},
        {"clip": {"columns": ["score"], "min": -1, "max": 10}},
        {"min_max": ["count", "score"]},
        {"standardize": ["amount"]},
    ).transforms
    fitted = fit_all(steps, x, COLUMNS)
    out = apply_all(fitted, x, COLUMNS)
    assert fitted[0].fill == [20.0]  # the median of 10 and 30: the missing value does not count
    assert out[:, 0].tolist() == pytest.approx([0.0, math.log(10) / math.log(100), 1.0])  # log1p, then [0, 1]
    assert out[:, 2].tolist() == pytest.approx([0.0, 6 / 11, 1.0])  # clipped to [-1, 10], then [0, 1]
    assert out[:, 1].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)  # 20 filled, standardized
    # Stored as plain data, they come back the same; the invertible ones invert.
    again = transforms_from_dicts([t.to_dict() for t in fitted])
    assert np.array_equal(apply_all(again, x, COLUMNS), out)
    back = invert_all(fitted, out, COLUMNS)
    assert back[:, 0].tolist() == pytest.approx([0.0, 9.0, 99.0], rel=1e-5)
    # A manifest stored before transforms had a shift reads as it did.
    (old,) = transforms_from_dicts(
        [{"kind": "standardize", "columns": ["score"], "mean": [2.0], "scale": [4.0]}]
    )
    assert old.apply(np.array([[0.0, 0.0, 6.0]]), COLUMNS)[0, 2] == 1.0


def test_missing_values_are_allowed_only_where_an_impute_step_fills_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=COLUMNS).assign(y=rng.integers(0, 2, 60))
    frame.loc[[3, 8], "amount"] = np.nan
    frame.to_csv(tmp_path / "d.csv", index=False)
    data = DataConfig(source="d.csv", target="y")
    with pytest.raises(UserError, match="feature column 'amount' has 2 missing values"):
        plan_feature_set("d", data, FeaturesConfig(), tmp_path)
    planned = plan_feature_set(
        "d", data, _steps({"impute": {"columns": ["amount"], "strategy": "mean"}}), tmp_path
    )
    assert all(np.isfinite(split.x).all() for split in planned.splits.values())

    # The registered model's input check: NaN passes in an imputed column, nowhere else.
    rows = pd.DataFrame({"count": [1.0], "amount": [np.nan], "score": [2.0]})
    assert np.isnan(feature_matrix(rows, COLUMNS, "m", allow_missing={"amount"})[0, 1])
    with pytest.raises(MlflowException, match=re.escape("'amount'")):
        feature_matrix(rows, COLUMNS, "m")


@pytest.mark.parametrize(
    ("step", "says"),
    [
        ({"log1p": ["score"]}, "log1p of score is undefined: values at or below -1 there"),
        ({"min_max": ["nope"]}, "min_max names nope, which are not feature columns"),
    ],
)
def test_a_transform_the_data_cannot_take_is_refused_naming_the_columns(
    tmp_path: Path, step: dict[str, object], says: str
) -> None:
    pd.DataFrame(
        {"count": [1, 2, 3, 4] * 5, "amount": [1.0] * 20, "score": [-3.0, 1.0] * 10, "y": [0, 1] * 10}
    ).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(UserError, match=re.escape(says)):
        plan_feature_set("d", DataConfig(source="d.csv", target="y"), _steps(step), tmp_path)


def test_transform_settings_are_checked_when_the_spec_is_read() -> None:
    with pytest.raises(ValueError, match="clip needs min, max or both"):
        _steps({"clip": {"columns": "*"}})
    with pytest.raises(
        ValueError, match=r"step 1: 'standardise' is not a transform \(did you mean 'standardize'\?\)"
    ):
        _steps({"standardise": "*"})
