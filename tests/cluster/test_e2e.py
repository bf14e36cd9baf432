"""The real CLI, end to end, on embedded Ray and a real MLflow SQLite store (no mocks).

Every test here reads the one uninterrupted ``raylens run`` of the reference project
(``reference_run`` in conftest.py): a 4-trial sweep, a 2-worker DDP final training, evaluation
and registration. ``tests/faults/test_interrupts.py`` compares an interrupted and resumed run
of the same spec against it (which is also where "same spec and seed, same result" is proven).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import models as mlflow_models

from raylens import Experiment
from raylens.errors import UserError
from tests.cli import CliRun, client, runs_of, snapshot

pytestmark = pytest.mark.e2e


def test_run_prints_a_summary_and_stays_quiet(reference_run: CliRun) -> None:
    out = reference_run.result.stdout
    for expected in (
        "Checking the spec and data",
        "Tuning",
        "Training",
        "test_accuracy",
        "models:/faults/1",
        "raylens ui",
    ):
        assert expected in out
    assert "INFO" not in out + reference_run.result.stderr
    assert "Traceback" not in reference_run.result.stderr


def test_the_store_holds_the_sweep_tree_final_run_and_model(
    reference_run: CliRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow = client(reference_run.folder)
    runs = runs_of(reference_run.folder)
    roles = {run.info.run_id: run.data.tags.get("raylens.role") for run in runs}
    (root_id,) = [rid for rid, role in roles.items() if role == "experiment"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == root_id]
    assert sorted(run.data.tags["raylens.role"] for run in children) == ["final"] + ["trial"] * 4
    assert all(run.info.status == "FINISHED" for run in runs)

    (final,) = [run for run in children if run.data.tags["raylens.role"] == "final"]
    history = mlflow.get_metric_history(final.info.run_id, "valid_loss")
    assert [m.step for m in history] == list(range(1, 9))
    assert final.data.metrics["test_accuracy"] >= 0.8
    assert final.data.tags["raylens.feature_set_version"]
    assert final.data.tags["raylens.parallel"] == "ddp (requested): 2 replicas, gradients averaged"
    assert "strategy ddp (requested): 2 replicas" in reference_run.result.stdout
    artifacts = [a.path for a in mlflow.list_artifacts(final.info.run_id, "plots")]
    assert {"plots/test_confusion_matrix.png", "plots/learning_curves.png"} <= set(artifacts)
    (version,) = mlflow.search_model_versions("name='faults'")
    assert str(version.version) == "1" and version.run_id == final.info.run_id

    # The root run: the spec and its parameters, and the best trial's configuration.
    (root,) = [run for run in runs if run.info.run_id == root_id]
    assert root.data.params["train.epochs"] == "8" and root.data.params["data.source"] == "iris.csv"
    assert "spec.yaml" in [a.path for a in mlflow.list_artifacts(root_id)]
    finished = [
        run
        for run in children
        if run.data.tags["raylens.role"] == "trial" and run.data.tags["raylens.stopped_early"] == "false"
    ]
    best = min(finished, key=lambda run: run.data.metrics["valid_loss"])
    assert root.data.params["best.train.optimizer.lr"] == best.data.params["train.optimizer.lr"]

    # The final run: every epoch of train and validation metrics, the confusion matrix as JSON
    # (summing to the test rows), the feature-set manifest.
    for key in ("train_loss", "valid_accuracy"):
        assert [m.step for m in mlflow.get_metric_history(final.info.run_id, key)] == list(range(1, 9))
    matrix_file = mlflow.download_artifacts(final.info.run_id, "test_confusion_matrix.json")
    matrix = json.loads(Path(matrix_file).read_text())
    assert matrix["labels"] == [0, 1, 2] and sum(map(sum, matrix["matrix"])) == 30
    manifest_file = mlflow.download_artifacts(final.info.run_id, "feature_set/manifest.json")
    assert (
        json.loads(Path(manifest_file).read_text())["version"]
        == final.data.tags["raylens.feature_set_version"]
    )

    # The model: signature, input example and lineage metadata.
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", f"sqlite:///{reference_run.folder / 'raylens-runs' / 'mlflow.db'}"
    )
    info = mlflow_models.get_model_info("models:/faults/1")
    assert info.signature is not None and [c.name for c in info.signature.inputs.inputs][:1] == [
        "sepal length (cm)"
    ]
    assert info.saved_input_example_info is not None
    assert info.metadata["feature_set_version"] == final.data.tags["raylens.feature_set_version"]
    assert info.metadata["raylens_version"] and info.metadata["task"] == "classification"


def test_registered_model_predicts_raw_features_in_a_fresh_process(
    reference_run: CliRun, tmp_path: Path
) -> None:
    """The served model takes raw columns and applies the fitted transform itself: on the raw
    test rows it scores exactly the test accuracy the run logged. It runs in another folder, so
    the spec's model factory (slow_models.py) comes from the model's own code, not the project."""
    folder = reference_run.folder
    script = f"""
import json, mlflow, numpy as np
from raylens.features import DataConfig
from raylens.features.sources import load_source
from raylens.features.splits import split_rows
mlflow.set_tracking_uri("sqlite:///{folder / "raylens-runs" / "mlflow.db"}")
model = mlflow.pyfunc.load_model("models:/faults/1")
frame = load_source("{folder / "iris.csv"}").table.to_pandas()
data = DataConfig(source="iris.csv", target="target", split={{"valid": 0.2, "test": 0.2, "seed": 3}})
test_rows = split_rows(frame["target"].to_numpy(), data.split, stratify=True).test
raw = frame.iloc[test_rows]
predicted = model.predict(raw.drop(columns=["target"]))
assert len(set(predicted)) > 1, "a constant model"
print(json.dumps({{"accuracy": float((predicted == raw["target"].to_numpy()).mean())}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300, cwd=tmp_path
    )
    accuracy = json.loads(out.stdout.strip().splitlines()[-1])["accuracy"]
    final = next(r for r in runs_of(folder) if r.data.tags.get("raylens.role") == "final")
    assert accuracy == pytest.approx(final.data.metrics["test_accuracy"])


def test_a_finished_run_is_not_resumed(reference_run: CliRun) -> None:
    before = snapshot(reference_run.folder)
    with pytest.raises(UserError, match="finished; start a new run without --resume"):
        Experiment.from_yaml(reference_run.folder / "spec.yaml", reference_run.folder / "raylens-runs").run(
            resume=True
        )
    assert snapshot(reference_run.folder) == before
