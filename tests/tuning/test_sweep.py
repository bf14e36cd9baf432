"""Sweeps on real Ray Tune, tracked in a real MLflow (SQLite) store."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from raylens.features import FeatureSet
from raylens.trainer import ModelConfig, TrainConfig
from raylens.trainer.tracking import MlflowTracker
from raylens.tuning import TuneConfig
from raylens.tuning.sweep import run_sweep
from raylens.tuning.tracking import TrialEvent

pytestmark = pytest.mark.usefixtures("ray_cluster")


def sweep(iris: FeatureSet, tmp_path: Path, tune: TuneConfig, train: TrainConfig):  # type: ignore[no-untyped-def]
    tmp_path.mkdir(parents=True, exist_ok=True)
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "sweep-test", tmp_path / "artifacts")
    parent = tracker.start_run("sweep")
    events: list[TrialEvent] = []
    model = ModelConfig(params={"hidden": [8]})
    result = run_sweep(
        tune,
        model,
        train,
        iris,
        tracker=tracker,
        parent_run_id=parent,
        storage_path=tmp_path / "ray",
        run_name="sweep",
        on_event=events.append,
    )
    tracker.end_run(parent)
    return result, events, tracker, parent


def test_sweep_tracks_every_trial_as_a_nested_run(iris: FeatureSet, tmp_path: Path) -> None:
    tune = TuneConfig(
        trials=4,
        concurrency=2,
        scheduler="asha",
        grace_period=1,
        metric="valid_accuracy",
        mode="max",
        space={"train.optimizer.lr": "loguniform(1e-3, 1e-1)", "model.params.hidden": "choice([[4], [16]])"},
    )
    result, events, tracker, parent = sweep(iris, tmp_path, tune, TrainConfig(epochs=3, batch_size=16))

    assert len(result.trials) == 4 and result.plan.concurrency == 2
    assert result.best_config in [t.config for t in result.trials]
    best_score = max(t.metrics["valid_accuracy"] for t in result.trials)
    assert result.best_metrics["valid_accuracy"] == best_score
    assert sum(e.kind == "completed" for e in events) == 4

    client: MlflowClient = tracker.client
    runs = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 4
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["raylens.role"] == "trial"
        assert "train.optimizer.lr" in run.data.params
        history = client.get_metric_history(run.info.run_id, "valid_loss")
        stopped_early = run.data.tags["raylens.stopped_early"] == "true"
        assert 1 <= len(history) < 3 if stopped_early else len(history) == 3
        assert [m.step for m in history] == list(range(1, len(history) + 1))


def test_same_seed_samples_the_same_configurations(iris: FeatureSet, tmp_path: Path) -> None:
    tune = TuneConfig(
        trials=2, concurrency=2, scheduler="fifo", seed=3, space={"train.optimizer.lr": "uniform(0.01, 0.1)"}
    )
    first, *_ = sweep(iris, tmp_path / "a", tune, TrainConfig(epochs=1))
    again, *_ = sweep(iris, tmp_path / "b", tune, TrainConfig(epochs=1))
    assert sorted(t.config["train.optimizer.lr"] for t in first.trials) == sorted(
        t.config["train.optimizer.lr"] for t in again.trials
    )


def test_a_trial_with_several_workers_runs_ray_train(iris: FeatureSet, tmp_path: Path) -> None:
    tune = TuneConfig(
        trials=1,
        concurrency=1,
        workers_per_trial=2,
        scheduler="fifo",
        space={"train.optimizer.lr": "choice([0.02])"},
    )
    result, events, *_ = sweep(iris, tmp_path, tune, TrainConfig(epochs=2, batch_size=8))
    assert result.trials[0].status == "completed"
    assert [e.metrics["epoch"] for e in events if e.kind == "result"] == [1.0, 2.0]
