"""``raylens validate`` and ``--dry-run``: every problem at once, nothing started or written, and
a mistake in the spec answered without importing torch, Ray or MLflow."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from raylens.cluster.cli import app
from raylens.cluster.experiment import Experiment
from raylens.errors import UserError

SPEC = """
name: churn
data: {source: churn.csv, target: churned}
model: {name: mlp, params: {hidden: [8]}}
train: {epochs: 2, scaling: {workers: 1}}
tune:
  trials: 2
  metric: valid_accuracy
  mode: max
  space: {train.optimizer.lr: "loguniform(1e-3, 1e-1)"}
"""


def project(folder: Path, spec: str = SPEC) -> Path:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"tenure": rng.integers(0, 60, 200), "charges": rng.normal(70, 20, 200)})
    frame["churned"] = (frame["tenure"] < 12).astype(int)
    frame.to_csv(folder / "churn.csv", index=False)
    (folder / "spec.yaml").write_text(spec)
    return folder / "spec.yaml"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    spec = project(tmp_path)
    experiment = Experiment.from_yaml(
        spec,
        tmp_path / "runs",
        ["model.params.hiden=[4]", "data.source=nowhere.csv", "tune.metric=valid_acuracy"],
    )
    report = experiment.validate()
    assert len(report.problems) == 3, report.problems
    assert "model.params.hiden" in report.problems[0] and "did you mean 'hidden'" in report.problems[0]
    assert "'nowhere.csv' does not exist" in report.problems[1]
    assert "tune.metric: 'valid_acuracy'" in report.problems[2] and "'valid_accuracy'" in report.problems[2]
    with pytest.raises(UserError, match="3 problems were found"):
        report.raise_problems()
    assert not (tmp_path / "runs").exists()


def test_a_sampled_configuration_that_fails_on_the_data_is_a_problem(tmp_path: Path) -> None:
    spec = project(tmp_path)
    overrides = ["tune.space.model.params.activation=choice(['relu', 'sigmod'])"]
    report = Experiment.from_yaml(spec, tmp_path / "runs", overrides).validate()
    assert len(report.problems) == 1
    assert "tune.space: a configuration the sweep may sample" in report.problems[0]
    assert "'sigmod' is not one of relu" in report.problems[0]
    assert Experiment.from_yaml(spec, tmp_path / "runs", overrides).validate(tune=False).ok


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = project(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(
        app,
        ["run", str(spec), "--dry-run", "--set", "train.epochs=7", "--set", "tune.goal=0.9"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "checked, nothing started or written" in result.output
    assert (
        "7 epochs" in result.output
        and "2 trials" in result.output
        and "ends at valid_accuracy ≥ 0.9" in result.output
    )
    assert "task" in result.output and "classification: 'churned' holds 2 distinct" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no raylens-runs, no feature set

    bad = CliRunner().invoke(app, ["validate", str(spec), "--set", "tune.metric=valid_r2"])
    assert bad.exit_code == 2
    assert "tune.metric: 'valid_r2' is not a metric raylens reports for classification" in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_spec_mistake_is_answered_without_importing_torch_ray_or_mlflow(tmp_path: Path) -> None:
    """What keeps the answer to a typo under a second: nothing heavy is imported on the way."""
    spec = project(tmp_path, SPEC.replace("epochs: 2", "epoch: 2"))
    probe = f"""
import json, sys
from typer.testing import CliRunner
from raylens.cluster.cli import app
result = CliRunner().invoke(app, ["validate", {str(spec)!r}])
heavy = sorted(m for m in ("torch", "ray", "mlflow", "pyarrow", "pandas", "sklearn") if m in sys.modules)
print(json.dumps([result.exit_code, result.output, heavy]))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    exit_code, output, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert exit_code == 2 and "train.epoch: unknown key 'epoch' (did you mean 'epochs'?)" in output
    assert heavy == []


def test_from_dict_takes_the_spec_as_a_mapping(tmp_path: Path) -> None:
    import yaml

    project(tmp_path)
    raw = yaml.safe_load(SPEC)
    experiment = Experiment.from_dict(raw, base_dir=tmp_path, runs_dir=tmp_path / "runs")
    assert experiment.spec.data.source == "churn.csv" and experiment.raw == raw
    assert experiment.validate().ok  # the relative data path is read from base_dir
    with pytest.raises(UserError, match=r"train\.epochs: Input should be greater than or equal to 1"):
        Experiment.from_dict({**raw, "train": {"epochs": 0}})


def test_class_weights_and_binary_metrics_are_checked_against_the_data(tmp_path: Path) -> None:
    spec = project(tmp_path)
    binary = ["tune.metric=valid_recall", "train.class_weights={1: 3.0}"]
    assert Experiment.from_yaml(spec, tmp_path / "runs", binary).validate().ok
    report = Experiment.from_yaml(spec, tmp_path / "runs", ["train.class_weights={stays: 3.0}"]).validate()
    assert report.problems == (
        "train.class_weights: 'stays' is not a class of this feature set; its classes are '0', '1'",
    )
    with pytest.raises(UserError, match=r"tune\.space\.train\.class_weights: class weights are fixed"):
        Experiment.from_yaml(spec, None, ["tune.space.train.class_weights=choice(['balanced'])"])


def test_the_early_stopping_metric_is_checked_against_the_task(tmp_path: Path) -> None:
    spec = project(tmp_path)
    ok = Experiment.from_yaml(spec, None, ["train.early_stopping={metric: valid_recall, mode: max}"])
    assert ok.validate(tune=False).ok
    wrong = Experiment.from_yaml(spec, None, ["train.early_stopping={metric: valid_rmse}"]).validate(
        tune=False
    )
    assert len(wrong.problems) == 1
    assert (
        "train.early_stopping.metric: 'valid_rmse' is not a metric raylens reports for classification"
        in (wrong.problems[0])
    )
