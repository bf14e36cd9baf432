"""`raylens tune` through the Python API (the CLI command calls ``Experiment.run(train=False)``):
the sweep alone, on the session's Ray cluster and a real MLflow store."""

from pathlib import Path

import mlflow
import pytest
import yaml

from raylens.cluster.experiment import Experiment
from raylens.cluster.workspace import Workspace
from raylens.errors import UserError

SPEC = """
name: sweep-only
data: {source: "sklearn:iris", target: target}
model: {params: {hidden: [8]}}
train: {epochs: 5}
tune:
  trials: 2
  concurrency: 2
  scheduler: fifo
  epochs: 1
  space: {train.optimizer.lr: "choice([0.01, 0.05])", model.params.hidden: "choice([[4], [8, 4]])"}
tracking: {register_as: never-registered}
"""


@pytest.mark.usefixtures("ray_cluster")
def test_tune_runs_the_sweep_alone_and_records_its_best(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(SPEC)
    summary = Experiment.from_yaml(tmp_path / "spec.yaml", tmp_path / "runs").run(train=False)

    assert summary.final is None and summary.trials == 2
    assert summary.best_config["train.optimizer.lr"] in (0.01, 0.05)
    client = mlflow.MlflowClient(Workspace.at(tmp_path / "runs").default_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-only").experiment_id])
    assert sorted(r.data.tags["raylens.role"] for r in runs) == ["experiment", "trial", "trial"]
    (root,) = [r for r in runs if r.data.tags["raylens.role"] == "experiment"]
    assert float(root.data.params["best.train.optimizer.lr"]) == summary.best_config["train.optimizer.lr"]
    assert all(len(client.get_metric_history(r.info.run_id, "valid_loss")) == 1 for r in runs if r != root)
    assert not client.search_registered_models()  # nothing trained, nothing registered

    # The hand-off to `raylens train`: best.yaml (run folder and MLflow), and --best-from.
    best = summary.best_config
    assert summary.best_spec is not None and summary.best_spec.parent.parent.parent.name == "ray"
    written = yaml.safe_load(summary.best_spec.read_text())
    assert "tune" not in written and written["model"]["params"]["hidden"] == best["model.params.hidden"]
    assert yaml.safe_load(mlflow.artifacts.load_text(f"{root.info.artifact_uri}/best.yaml")) == written
    from_file = Experiment.from_yaml(summary.best_spec, tmp_path / "runs").spec
    assert from_file.tune is None and from_file.train.optimizer.lr == best["train.optimizer.lr"]
    handed = Experiment.from_yaml(
        tmp_path / "spec.yaml", tmp_path / "runs", ["train.epochs=3"], best_from=summary.root_run_id
    )
    assert handed.spec.train.optimizer.lr == best["train.optimizer.lr"] and handed.spec.train.epochs == 3
    assert handed.spec.model.params["hidden"] == best["model.params.hidden"]
    trial = next(r for r in runs if r != root)
    with pytest.raises(UserError, match="holds no best configuration"):
        Experiment.from_yaml(tmp_path / "spec.yaml", tmp_path / "runs", best_from=trial.info.run_id)
    with pytest.raises(UserError, match="no MLflow run 'nope'"):
        Experiment.from_yaml(tmp_path / "spec.yaml", tmp_path / "runs", best_from="nope")
