"""The real CLI, end to end, on embedded Ray and a real MLflow SQLite store (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e

SPEC = """
name: iris-e2e
data: {source: "sklearn:iris", target: target, split: {valid: 0.2, test: 0.2, seed: 3}}
features: {transforms: [{standardize: "*"}]}
model: {name: mlp, params: {hidden: [16]}}
train: {epochs: 6, batch_size: 8, optimizer: {lr: 0.02}, scaling: {workers: 2, strategy: ddp}}
tune:
  trials: 2
  concurrency: 2
  epochs: 2
  space: {train.optimizer.lr: "loguniform(1e-3, 5e-2)"}
tracking: {register_as: iris-e2e}
"""

RAYLENS = str(Path(sys.executable).parent / "raylens")


def raylens(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # A fresh user shell: no Ray address and no MLflow settings left by other tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env["COLUMNS"] = "200"
    done = subprocess.run([RAYLENS, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("e2e")
    (folder / "iris.yaml").write_text(SPEC)
    return folder


@pytest.fixture(scope="module")
def first_run(project: Path) -> subprocess.CompletedProcess[str]:
    return raylens("run", "iris.yaml", cwd=project)


def client(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'raylens-runs' / 'mlflow.db'}")


def test_run_prints_a_summary_and_stays_quiet(first_run: subprocess.CompletedProcess[str]) -> None:
    out = first_run.stdout
    for expected in (
        "Checking the spec and data",
        "Tuning",
        "Training",
        "test_accuracy",
        "models:/iris-e2e/1",
        "raylens ui",
    ):
        assert expected in out
    assert "INFO" not in out + first_run.stderr
    assert "Traceback" not in first_run.stderr


def test_the_store_holds_the_sweep_tree_final_run_and_model(
    project: Path, first_run: subprocess.CompletedProcess[str]
) -> None:
    mlflow = client(project)
    experiment = mlflow.get_experiment_by_name("iris-e2e")
    runs = mlflow.search_runs([experiment.experiment_id])
    roles = {run.info.run_id: run.data.tags.get("raylens.role") for run in runs}
    (root_id,) = [rid for rid, role in roles.items() if role == "experiment"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == root_id]
    assert sorted(run.data.tags["raylens.role"] for run in children) == ["final", "trial", "trial"]
    assert all(run.info.status == "FINISHED" for run in runs)

    (final,) = [run for run in children if run.data.tags["raylens.role"] == "final"]
    history = mlflow.get_metric_history(final.info.run_id, "valid_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert final.data.metrics["test_accuracy"] >= 0.8
    assert final.data.tags["raylens.feature_set_version"]
    artifacts = [a.path for a in mlflow.list_artifacts(final.info.run_id, "plots")]
    assert "plots/test_confusion_matrix.png" in artifacts
    (version,) = mlflow.search_model_versions("name='iris-e2e'")
    assert str(version.version) == "1" and version.run_id == final.info.run_id


def test_registered_model_predicts_raw_features_in_a_fresh_process(
    project: Path, first_run: subprocess.CompletedProcess[str]
) -> None:
    """The served model takes raw columns and applies the fitted transform itself: on the raw
    test rows it scores exactly the test accuracy the run logged."""
    script = f"""
import json, mlflow, numpy as np
from raylens.features import DataConfig
from raylens.features.sources import load_source
from raylens.features.splits import split_rows
mlflow.set_tracking_uri("sqlite:///{project / "raylens-runs" / "mlflow.db"}")
model = mlflow.pyfunc.load_model("models:/iris-e2e/1")
frame = load_source("sklearn:iris").table.to_pandas()
data = DataConfig(source="sklearn:iris", target="target", split={{"valid": 0.2, "test": 0.2, "seed": 3}})
test_rows = split_rows(frame["target"].to_numpy(), data.split, stratify=True).test
raw = frame.iloc[test_rows]
predicted = model.predict(raw.drop(columns=["target"]))
print(json.dumps({{"accuracy": float((predicted == raw["target"].to_numpy()).mean())}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300
    )
    accuracy = json.loads(out.stdout.strip().splitlines()[-1])["accuracy"]
    mlflow = client(project)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("iris-e2e").experiment_id])
    final = next(r for r in runs if r.data.tags.get("raylens.role") == "final")
    assert accuracy == pytest.approx(final.data.metrics["test_accuracy"])


def test_same_spec_and_seed_give_the_same_features_and_test_metrics(project: Path) -> None:
    first = raylens("train", "iris.yaml", cwd=project)
    second = raylens("train", "iris.yaml", cwd=project)

    def rows(output: str) -> dict[str, str]:
        return {
            parts[1].strip(): parts[2].strip()
            for line in output.splitlines()
            if (parts := line.split("│")) and len(parts) == 4
        }

    a, b = rows(first.stdout), rows(second.stdout)
    assert a["feature set"] == b["feature set"]
    for metric in ("test_loss", "test_accuracy", "test_f1_macro"):
        assert a[metric] == b[metric]
    versions = client(project).search_model_versions("name='iris-e2e'")
    assert sorted(int(v.version) for v in versions)[-1] >= 3
