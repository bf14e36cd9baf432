"""``raylens pipeline``: a full release on real Ray Serve and MLflow; a worse model stopped by the
gate with production left where it was; manual approval; continuous training that retrains on
drifted data and not on unchanged data."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.datasets import make_classification
from typer.testing import CliRunner

from raylens.cluster.cli import app
from raylens.cluster.ct import check_retraining
from raylens.cluster.experiment import Experiment
from raylens.cluster.pipeline import REJECTED, RELEASED, STAGED, Pipeline
from raylens.cluster.release import alias_history, current_version, move_alias
from raylens.errors import UserError

MODEL = "churn-clf"


def write_rows(path: Path, shift: float = 0.0, seed: int = 0) -> None:
    x, y = make_classification(n_samples=500, n_features=5, n_informative=4, n_redundant=0, random_state=seed)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    frame["f0"] += shift
    frame["label"] = y
    frame.to_csv(path, index=False)


def write_spec(folder: Path, **release: object) -> Path:
    spec = {
        "name": "churn",
        "data": {"source": "rows.csv", "target": "label", "split": {"valid": 0.2, "test": 0.3, "seed": 0}},
        "features": {"transforms": [{"standardize": "*"}]},
        "model": {"family": "sklearn", "name": "logistic_regression", "params": {"C": 1.0}},
        "tracking": {"register_as": MODEL},
        "release": release,
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def client_of(experiment: Experiment) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(experiment.tracking_uri, registry_uri=experiment.tracking_uri)


def test_a_release_then_a_worse_model_stopped_by_the_gate_then_retraining_on_drift(
    ray_cluster: None, tmp_path: Path
) -> None:
    write_rows(tmp_path / "rows.csv")
    spec = write_spec(tmp_path)
    runs = tmp_path / "runs"
    experiment = Experiment.from_yaml(spec, runs)
    client = client_of(experiment)

    result = Pipeline(experiment).run()
    assert (result.state, result.version, result.production) == (RELEASED, "1", "1")
    assert result.smoke_rows == 150  # every test row over HTTP, equal to the offline predictions
    assert result.verdict is not None and result.verdict.first_release
    run = client.get_run(result.run_id)
    assert {k: v for k, v in run.data.tags.items() if k.startswith("raylens.pipeline.step.")} == {
        f"raylens.pipeline.step.{step}": "done"
        for step in ("train", "gate", "staging", "smoke", "production")
    }
    assert run.data.metrics["smoke_mismatches"] == 0
    train_run = client.get_run(run.data.tags["raylens.pipeline.train_run"])
    root = client.get_run(train_run.data.tags["mlflow.parentRunId"])
    assert root.data.tags["mlflow.parentRunId"] == result.run_id  # the training nested in the pipeline
    assert current_version(client, MODEL, "staging") == "1"

    # A deliberately worse model: registered, refused by the gate; production stays at 1.
    runner = CliRunner()
    dry = runner.invoke(
        app, ["pipeline", str(spec), "--runs-dir", str(runs), "--dry-run"], env={"COLUMNS": "200"}
    )
    assert dry.exit_code == 0 and "version 1" in dry.output.split("production now")[1].splitlines()[0], (
        dry.output
    )
    worse = runner.invoke(
        app,
        ["pipeline", str(spec), "--runs-dir", str(runs), "--set", "model.params.C=0.0002"],
        env={"COLUMNS": "200"},
    )
    assert worse.exit_code == 1, worse.output
    assert "rejected" in worse.output and "does not clear the margin" in worse.output
    assert current_version(client, MODEL, "production") == "1"
    assert current_version(client, MODEL, "staging") == "1"
    assert client.get_model_version(MODEL, "2").tags["raylens.gate"] == "failed"
    assert [m.version for m in alias_history(client, MODEL, "production")] == ["1"]

    # Unchanged data: nothing to do. Drifted data: retrain, naming the column, and `ct check`
    # runs the pipeline on it.
    unchanged = check_retraining(experiment)
    assert not unchanged.retrain and "unchanged" in unchanged.reasons[0]
    quiet = runner.invoke(app, ["ct", "check", str(spec), "--runs-dir", str(runs)], env={"COLUMNS": "200"})
    assert quiet.exit_code == 0 and "no retraining needed" in quiet.output, quiet.output
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2  # nothing trained
    write_rows(tmp_path / "rows.csv", shift=3.0)
    drifted = check_retraining(Experiment.from_yaml(spec, runs))
    assert drifted.retrain and drifted.trained_on != drifted.newest
    assert any("'f0' drifted" in reason for reason in drifted.reasons), drifted.reasons
    assert not any("'f1' drifted" in reason for reason in drifted.reasons)
    retrained = runner.invoke(
        app, ["ct", "check", str(spec), "--runs-dir", str(runs)], env={"COLUMNS": "200"}
    )
    assert "retrain" in retrained.output and "'f0' drifted" in retrained.output, retrained.output
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 3  # the pipeline trained on it
    released = current_version(client, MODEL, "production")
    summary = client.get_model_version(MODEL, "3").tags["raylens.gate.summary"]
    assert "production was trained on data version" in summary  # said beside the evidence
    assert (retrained.exit_code, released) in ((0, "3"), (1, "1")), retrained.output  # released or gated

    # A column gone: production cannot be scored on the new rows; said, and nothing released.
    pd.read_csv(tmp_path / "rows.csv").drop(columns=["f4"]).to_csv(tmp_path / "rows.csv", index=False)
    with pytest.raises(
        UserError, match=rf"the gate cannot score production version {released} .* columns changed"
    ):
        Pipeline(Experiment.from_yaml(spec, runs)).run()
    assert current_version(client, MODEL, "production") == released


def test_manual_approval_stops_at_staging_until_approved(ray_cluster: None, tmp_path: Path) -> None:
    """The whole pipeline on scikit-learn's bundled breast cancer data."""
    raw = yaml.safe_load(write_spec(tmp_path, approval="manual").read_text())
    raw["data"] = {
        "source": "sklearn:breast_cancer",
        "target": "target",
        "split": {"valid": 0.2, "test": 0.3},
    }
    experiment = Experiment.from_dict(raw, base_dir=tmp_path, runs_dir=tmp_path / "runs")
    client = client_of(experiment)

    staged = Pipeline(experiment).run()
    assert (staged.state, staged.production, staged.smoke_rows) == (STAGED, None, 171)
    assert current_version(client, MODEL, "staging") == "1"
    # Production moved after the gate judged the staged version: approving it is refused.
    client.create_model_version(MODEL, source=str(tmp_path))
    move_alias(client, MODEL, "production", "2", "released by hand meanwhile")
    with pytest.raises(UserError, match="production moved since the gate judged version 1"):
        Pipeline(experiment, approve=True).run(resume=True)
    assert current_version(client, MODEL, "production") == "2"
    client.delete_registered_model_alias(MODEL, "production")  # back to what the gate judged against
    approved = Pipeline(experiment, approve=True).run(resume=True)
    assert approved.run_id == staged.run_id  # the same pipeline run, continued at its last step
    assert (approved.state, approved.production) == (RELEASED, "1")
    assert "approved release" in alias_history(client, MODEL, "production")[-1].reason
    with pytest.raises(
        UserError, match="no pipeline of 'churn' to resume \\(the latest one ended released\\)"
    ):
        Pipeline(experiment, approve=True).run(resume=True)


def test_a_first_release_below_the_threshold_is_not_released(ray_cluster: None, tmp_path: Path) -> None:
    write_rows(tmp_path / "rows.csv")
    experiment = Experiment.from_yaml(write_spec(tmp_path, threshold=0.999), tmp_path / "runs")
    result = Pipeline(experiment).run()
    assert result.state == REJECTED and result.production is None
    assert result.verdict is not None and "must be at least 0.999" in result.verdict.failures[0]
    assert current_version(client_of(experiment), MODEL, "staging") is None


def test_a_pipeline_needs_a_registered_model_name(tmp_path: Path) -> None:
    write_rows(tmp_path / "rows.csv")
    raw = yaml.safe_load(write_spec(tmp_path).read_text())
    del raw["tracking"]
    with pytest.raises(UserError, match=r"tracking.register_as: a pipeline releases a registered model"):
        Pipeline(Experiment.from_dict(raw, base_dir=tmp_path, runs_dir=tmp_path / "runs"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_mistake_in_the_data_writes_nothing(tmp_path: Path) -> None:
    write_rows(tmp_path / "rows.csv")
    spec = write_spec(tmp_path)
    runner = CliRunner()
    runs = tmp_path / "runs"
    done = runner.invoke(app, ["pipeline", str(spec), "--runs-dir", str(runs), "--set", "data.target=labl"])
    assert done.exit_code == 2 and "labl" in done.output, done.output
    assert not runs.exists()  # no tracking store, no pipeline run, no feature set
    planned = runner.invoke(
        app, ["pipeline", str(spec), "--runs-dir", str(runs), "--dry-run"], env={"COLUMNS": "200"}
    )
    assert planned.exit_code == 0, planned.output
    assert "raylens pipeline: checked, nothing started or written" in planned.output
    assert "production now" in planned.output and "none (a first release" in planned.output
    assert not runs.exists()
    crowded = runner.invoke(
        app, ["pipeline", str(spec), "--runs-dir", str(runs), "--set", "serve.replicas=64"]
    )
    assert crowded.exit_code == 2 and "64 replicas x 1 CPU need 64 CPUs" in crowded.output, crowded.output
    assert not runs.exists()  # refused before the training, not at the smoke test
    again = runner.invoke(app, ["pipeline", str(spec), "--runs-dir", str(runs), "--resume"])
    assert again.exit_code == 2 and "no pipeline of 'churn' to resume" in again.output, again.output
    assert not runs.exists()


def test_promote_and_rollback_on_the_command_line(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(MODEL)
    for _ in range(2):
        client.create_model_version(MODEL, source=str(tmp_path))
    runner = CliRunner()
    args = ["--tracking-uri", uri]
    for version in ("1", "2"):
        done = runner.invoke(app, ["promote", MODEL, version, "--reason", f"release {version}", *args])
        assert done.exit_code == 0, done.output
    assert "churn-clf@production → version 2 (was version 1): release 2" in done.output
    back = runner.invoke(app, ["rollback", MODEL, "--reason", "errors up", *args])
    assert back.exit_code == 0 and current_version(client, MODEL, "production") == "1"
    missing = runner.invoke(app, ["promote", MODEL, "9", "--reason", "x", *args])
    assert missing.exit_code == 2 and "has no version 9" in missing.output
    no_reason = runner.invoke(app, ["promote", MODEL, "2", *args])
    assert no_reason.exit_code == 2 and "--reason" in no_reason.output
    assert current_version(client, MODEL, "production") == "1"
    assert np.array_equal([m.version for m in alias_history(client, MODEL, "production")], ["1", "2", "1"])
    (tmp_path / "elsewhere").mkdir()
    wrong = runner.invoke(
        app, ["rollback", MODEL, "--reason", "x", "--runs-dir", str(tmp_path / "elsewhere")]
    )
    assert wrong.exit_code == 2 and "no runs in" in wrong.output
    assert not any((tmp_path / "elsewhere").iterdir())  # no store created where there was none


def test_a_resume_never_continues_another_runs_training(ray_cluster: None, tmp_path: Path) -> None:
    """A pipeline whose training failed (a debugger rule with action fail) resumes its own
    training run only: when another run of the spec came since, the resume is refused."""
    write_rows(tmp_path / "rows.csv")
    rows = pd.read_csv(tmp_path / "rows.csv")
    rows.loc[rows.index % 5 != 0, "label"] = 0  # about 1 row in 10 of the second class
    rows.to_csv(tmp_path / "rows.csv", index=False)
    raw = yaml.safe_load(write_spec(tmp_path).read_text())
    raw["model"] = {"family": "torch", "name": "mlp", "params": {"hidden": [8]}}
    rule = {"class_imbalance": {"ratio": 0.5, "action": "fail"}}
    raw["train"] = {"epochs": 2, "batch_size": 32, "debug": {"rules": rule}}
    failing = Experiment.from_dict(raw, base_dir=tmp_path, runs_dir=tmp_path / "runs")
    with pytest.raises(Exception, match="class_imbalance"):
        Pipeline(failing).run()
    client = client_of(failing)
    (failed,) = client.search_runs(
        [client.get_experiment_by_name("churn").experiment_id], "tags.`raylens.role` = 'pipeline'"
    )
    assert failed.data.tags["raylens.pipeline.step.train"] == "failed"
    del raw["train"]["debug"]
    Experiment.from_dict(raw, base_dir=tmp_path, runs_dir=tmp_path / "runs").run(tune=False)
    with pytest.raises(UserError, match="is not this pipeline's training"):
        Pipeline(failing).run(resume=True)
