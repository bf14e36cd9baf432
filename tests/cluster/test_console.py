"""What the terminal shows (rendered to a string; no Ray)."""

import json
from io import StringIO
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from raylens.cluster.cli import app
from raylens.cluster.console import RichProgress, summary_table
from raylens.cluster.experiment import RunSummary
from raylens.cluster.workspace import Workspace
from raylens.features import DataConfig, FeaturesConfig, FeatureSet, build_feature_set
from raylens.features.manifest import Manifest
from raylens.tuning.tracking import TrialEvent


def rendered(renderable: object) -> str:
    out = StringIO()
    Console(file=out, width=200).print(renderable)
    return out.getvalue()


def test_the_summary_names_the_command_that_ran_and_prints_values_verbatim(iris: FeatureSet) -> None:
    summary = RunSummary("iris", "iris/20261129-1", iris, "sqlite:////data/[team]/mlflow.db", "root")
    shown = rendered(summary_table(summary, "train"))
    assert "raylens train iris/20261129-1" in shown
    assert "sqlite:////data/[team]/mlflow.db" in shown


def test_the_trials_bar_shows_the_best_value_so_far_among_trials_that_ran_to_the_end() -> None:
    def finished(score: float, stopped_early: bool = False) -> TrialEvent:
        return TrialEvent("completed", "t", {"lr": 0.1}, {"valid_loss": score}, stopped_early)

    progress = RichProgress(Console(file=StringIO()), "valid_loss", "min")
    for event in (finished(0.5), finished(0.2, stopped_early=True), finished(0.4), finished(0.45)):
        progress.trial(event)
    assert progress.best == 0.4
    accuracy = RichProgress(Console(file=StringIO()), "valid_accuracy", "max")
    for score in (0.8, 0.9, 0.85):
        accuracy.trial(TrialEvent("completed", "t", {}, {"valid_accuracy": score}))
    assert accuracy.best == 0.9


def test_a_trial_line_says_why_it_failed_or_that_it_ended_the_sweep() -> None:
    out = StringIO()
    progress = RichProgress(Console(file=out, width=200), "valid_accuracy", "max")
    diverged = "raylens.trainer.family.TrainingFailed: the training loss became nan in epoch 1: [lower lr]"
    progress.trial(TrialEvent("failed", "t_00000", {"train.optimizer.lr": 1e6}, error=diverged))
    progress.trial(TrialEvent("completed", "t_00001", {}, {"valid_accuracy": 0.91}, reached_goal=True))
    shown = out.getvalue()
    why = "TrainingFailed: the training loss became nan in epoch 1: [lower lr]"  # no module path
    assert f"t_00000: lr=1e+06 → failed: {why}" in shown
    assert "t_00001:  → valid_accuracy 0.91 (goal reached: the sweep ends)" in shown


def test_notices_print_verbatim() -> None:
    out = StringIO()
    RichProgress(Console(file=out, width=200)).notice("resuming from [bold]run[/] with data.drop: [plan]")
    assert "resuming from [bold]run[/] with data.drop: [plan]" in out.getvalue()


def stored_iris(runs: Path) -> FeatureSet:
    """The iris feature set in the offline store of run folder ``runs``."""
    return build_feature_set(
        "iris",
        DataConfig(source="sklearn:iris", target="target"),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        Workspace.at(runs).feature_store,
    )


def test_features_show_is_a_readable_summary_and_json_is_the_manifest(tmp_path: Path) -> None:
    iris = stored_iris(tmp_path)
    shown = CliRunner().invoke(
        app, ["features", "show", "iris", "--runs-dir", str(tmp_path)], env={"COLUMNS": "100"}
    )
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert f"iris@{iris.version}" in shown.output and "3: 0, 1, 2" in shown.output
    assert "standardize on 4 columns (fitted on train)" in shown.output
    assert any("sepal length (cm)" in line and "double" in line for line in lines)
    assert len(lines) < 40  # a summary, not the manifest (hundreds of lines)
    as_json = CliRunner().invoke(
        app, ["features", "show", "iris", iris.version, "--runs-dir", str(tmp_path), "--json"]
    )
    assert Manifest.model_validate(json.loads(as_json.output)) == iris.manifest


def test_tables_wrap_ids_instead_of_cutting_them(tmp_path: Path) -> None:
    iris = stored_iris(tmp_path)
    listed = CliRunner().invoke(app, ["features", "list", "--runs-dir", str(tmp_path)], env={"COLUMNS": "50"})
    assert listed.exit_code == 0 and iris.version in listed.output
    assert "…" not in listed.output  # folded onto more lines, never cut with an ellipsis


def test_the_summary_wraps_long_paths_instead_of_cutting_them(iris: FeatureSet) -> None:
    best = Path("/very/long/run/folder") / ("x" * 120) / "best.yaml"
    summary = RunSummary("iris", "iris/1", iris, "sqlite:///db", "root", trials=2, best_spec=best)
    out = StringIO()
    Console(file=out, width=80).print(summary_table(summary))
    assert "…" not in out.getvalue()
    assert "x" * 40 in out.getvalue() and "best.yaml" in out.getvalue()
