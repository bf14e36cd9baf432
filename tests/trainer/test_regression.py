"""Regression end to end, in-process: scikit-learn's diabetes set (and the same target moved far
from zero) trained with the plain loop, scored against scikit-learn's metrics on the same
predictions, its losses reported and its predictions served in the target's units."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.exceptions import MlflowException
from sklearn import metrics as sk
from sklearn.datasets import load_diabetes

from raylens.features import DataConfig, FeaturesConfig, build_feature_set, invert_all, transforms_from_dicts
from raylens.trainer import (
    Batches,
    TorchModelConfig,
    TrainConfig,
    TrainJob,
    build_model,
    evaluate,
    predict,
    run_worker,
)
from raylens.trainer.family import Trained
from raylens.trainer.parallel import gather_checkpoint
from raylens.trainer.torch_family import TorchPredictor
from raylens.trainer.tracking import MlflowTracker


class KeepLast:
    def report(self, metrics: dict[str, float], state) -> None:  # type: ignore[no-untyped-def]
        self.metrics = metrics
        self.state = gather_checkpoint(state.model, state.optimizer, state.epoch)


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_diabetes_trains_scores_like_scikit_learn_and_serves_in_target_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: float
) -> None:
    frame = load_diabetes(as_frame=True).frame
    frame["target"] = frame["target"] + offset
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "diabetes.parquet")
    fs = build_feature_set(
        "diabetes",
        DataConfig(source=str(tmp_path / "diabetes.parquet"), target="target"),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        tmp_path / "store",
    )
    assert fs.task == "regression"  # a float target
    job = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [32]}),
        TrainConfig(epochs=20, batch_size=32, optimizer={"lr": 0.01}),
        fs,
    )
    reporter = KeepLast()
    run_worker(job, fs.read("train"), fs.read("valid"), reporter)
    model = build_model(job.model, job.in_features, job.task.out_features)
    model.load_state_dict(reporter.state["model"])

    test = fs.read("test")
    ours = evaluate(model, Batches.from_numpy(test.x, test.y), job.task)
    predicted = predict(model, torch.from_numpy(test.x), job.task)
    # scikit-learn scores float32 inputs in float32; raylens sums in float64: compare in float64.
    y64, p64 = test.y.astype(np.float64), predicted.astype(np.float64)
    assert np.abs(predicted - offset).mean() < 400  # in the target's units, not standardized ones
    assert ours["r2"] == pytest.approx(sk.r2_score(y64, p64), abs=1e-6)
    assert ours["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(y64, p64)), abs=1e-6)
    assert ours["mae"] == pytest.approx(sk.mean_absolute_error(y64, p64), abs=1e-6)
    assert ours["r2"] > 0.2  # it learned something: a constant model scores about 0
    # Every loss reported is the mean squared error in the target's units, not standardized ones
    # (std² ≈ 6000 times larger). The loss is computed from the standardized float32 output, the
    # RMSE from predictions in float32 units: near 1e6 (a float32 step of 0.06) they agree to 3 digits.
    close = 1e-5 if offset == 0 else 1e-3
    assert ours["loss"] == pytest.approx(sk.mean_squared_error(y64, p64), rel=close)
    assert reporter.metrics["valid_loss"] == pytest.approx(reporter.metrics["valid_rmse"] ** 2, rel=close)

    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "diabetes", tmp_path / "artifacts")
    run_id = tracker.start_run("final")
    trained = Trained(TorchPredictor(model, job.task), [], tmp_path)
    model_uri = tracker.log_model(run_id, trained, job, fs, x_sample=test.x).uri
    tracker.end_run(run_id)
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading puts the model's code folder first
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    served = mlflow.pyfunc.load_model(model_uri)
    raw = invert_all(transforms_from_dicts(fs.manifest.transforms), test.x, fs.feature_columns)
    answer = np.asarray(served.predict(pd.DataFrame(raw, columns=fs.feature_columns)), dtype=np.float64)
    assert answer == pytest.approx(predicted.astype(np.float64), rel=1e-4, abs=1e-3)

    with pytest.raises(MlflowException) as refused:
        served.predict(pd.DataFrame(raw, columns=fs.feature_columns), params={"output": "probabilities"})
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "'probabilities' needs a classification model" in refused.value.message
