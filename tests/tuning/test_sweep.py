"""Sweeps on real Ray Tune, tracked in a real MLflow (SQLite) store."""

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from ray.tune.experiment import Experiment

from raylens.errors import UserError
from raylens.features import FeatureSet
from raylens.trainer import Batches, TorchModelConfig, TrainConfig, TrainJob, build_model, evaluate
from raylens.trainer.parallel import load_checkpoint
from raylens.trainer.tracking import MlflowTracker
from raylens.tuning import TuneConfig, candidates_of
from raylens.tuning.sweep import run_sweep, searcher, tune_space
from raylens.tuning.tracking import TrialEvent
from tests.conftest import iris_feature_set

pytestmark = pytest.mark.usefixtures("ray_cluster")


def sweep(  # type: ignore[no-untyped-def]
    iris: FeatureSet,
    tmp_path: Path,
    tune: TuneConfig,
    train: TrainConfig,
    model: TorchModelConfig = TorchModelConfig(params={"hidden": [8]}),
):
    tmp_path.mkdir(parents=True, exist_ok=True)
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "sweep-test", tmp_path / "artifacts")
    parent = tracker.start_run("sweep")
    events: list[TrialEvent] = []
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


DIVERGING = TuneConfig(
    trials=4,
    concurrency=2,
    scheduler="asha",
    grace_period=1,
    metric="valid_loss",
    mode="min",
    seed=176,
    space={
        "train.optimizer.lr": "choice([0.01, 0.05, 100.0])",
        "model.params.step_seconds": "choice([0.0, 0.1])",
    },
)
"""In trial order (lr, seconds per step): (0.01, 0.1), (0.05, 0), (100, 0.1), (100, 0.1). Trials 0
and 1 start together; trial 1, better and fast, reaches each milestone first. Ray's own ASHA,
judging by arrival, stops trial 0 at its first milestone; judged in trial order, trial 0 (the
first) trains to the end, and the two diverging trials are stopped."""
SLOW_MLP = TorchModelConfig(
    name="tests.faults.slow_models:build", params={"hidden": [8], "step_seconds": 0.0}
)


@pytest.fixture(scope="module")
def diverging(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None):  # type: ignore[no-untyped-def]
    """One ASHA sweep in which two trials' learning rate makes training diverge."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    iris_set = iris_feature_set(tmp_path)
    return iris_set, sweep(iris_set, tmp_path, DIVERGING, TrainConfig(epochs=3, batch_size=16), SLOW_MLP)


def test_asha_stops_the_trials_that_diverge_and_tracks_every_trial(diverging) -> None:  # type: ignore[no-untyped-def]
    _, (result, events, tracker, parent) = diverging
    lrs = [t.config["train.optimizer.lr"] for t in result.trials]
    assert lrs == [0.01, 0.05, 100.0, 100.0] and result.plan.concurrency == 2
    assert [t.status for t in result.trials] == ["completed", "completed", "stopped", "stopped"]
    assert [t.stopped_at for t in result.trials] == [None, None, 1, 1]
    assert result.best_config == {"train.optimizer.lr": 0.05, "model.params.step_seconds": 0.0}
    assert result.best_metrics == result.trials[1].metrics
    assert result.best_metrics["valid_accuracy"] > 0.8 and result.best_metrics["epoch"] == 3
    assert sum(e.kind == "completed" for e in events) == 4

    client: MlflowClient = tracker.client
    runs = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    by_trial = {run.data.tags["raylens.trial_id"]: run for run in runs}
    assert sorted(by_trial) == [t.trial_id for t in result.trials]
    for trial in result.trials:
        run = by_trial[trial.trial_id]
        assert run.info.status == "FINISHED" and run.data.tags["raylens.role"] == "trial"
        assert float(run.data.params["train.optimizer.lr"]) == trial.config["train.optimizer.lr"]
        assert run.data.tags["raylens.stopped_early"] == str(trial.status == "stopped").lower()
        history = client.get_metric_history(run.info.run_id, "valid_loss")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        assert len(history) == 3 if trial.status == "completed" else len(history) >= 1
        assert history[-1].value == trial.metrics["valid_loss"] or trial.status == "stopped"


def test_another_seed_samples_other_configurations() -> None:
    def planned(seed: int) -> list[dict[str, float]]:
        """The configurations the sweep's own searcher draws, in trial order."""
        config = DIVERGING.model_copy(update={"seed": seed})
        candidates = candidates_of(config, TorchModelConfig())
        search = searcher(config, candidates)
        search.add_configurations(
            [Experiment("plan", lambda c: None, config=tune_space(config, candidates), num_samples=4)]
        )
        trials = iter(search.next_trial, None)
        return [trial.config for trial in trials]

    assert planned(176) == planned(176)
    assert [c["train.optimizer.lr"] for c in planned(176)] == [0.01, 0.05, 100.0, 100.0]
    assert planned(1) != planned(176) and planned(2) != planned(176)


def test_a_trial_with_several_workers_is_a_ray_train_run_of_its_own(iris: FeatureSet, tmp_path: Path) -> None:
    """The Ray Train bridge (the final training uses the same): 2 DDP workers over gloo report
    every epoch once, keep the latest ``checkpoints_to_keep`` checkpoints of the full unwrapped
    model, and report the validation metrics of the whole split (scored in shards, all-reduced)."""
    tune = TuneConfig(
        trials=1,
        concurrency=1,
        workers_per_trial=2,
        scheduler="fifo",
        space={"train.optimizer.lr": "choice([0.02])"},
    )
    train = TrainConfig(epochs=3, batch_size=8, checkpoints_to_keep=2)
    result, events, *_ = sweep(iris, tmp_path, tune, train, TorchModelConfig(params={"hidden": [16]}))
    (trial,) = result.trials
    assert trial.status == "completed"
    reported = [e.metrics for e in events if e.kind == "result"]
    assert [m["epoch"] for m in reported] == [1.0, 2.0, 3.0]
    assert reported[-1]["valid_loss"] < reported[0]["valid_loss"]

    (run,) = (tmp_path / "ray" / "trials").glob(f"*{trial.trial_id}")
    assert (run / "checkpoint_manager_snapshot.json").is_file()  # Ray Train's own record of the run
    kept = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2
    state = load_checkpoint(kept[-1])
    assert state["epoch"] == 3 and state["model"]["net.0.weight"].shape == torch.Size([16, 4])
    assert not any(key.startswith("module.") for key in state["model"])
    job = TrainJob.for_feature_set(TorchModelConfig(params={"hidden": [16]}), train, iris)
    model = build_model(job.model, job.in_features, job.task.out_features)
    model.load_state_dict(state["model"])
    valid = iris.read("valid")
    whole = evaluate(model, Batches.from_numpy(valid.x, valid.y), job.task)
    assert reported[-1]["valid_loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert reported[-1]["valid_accuracy"] == pytest.approx(whole["accuracy"])


def test_a_failing_trial_is_a_failed_run_with_its_error(iris: FeatureSet, tmp_path: Path) -> None:
    """Its training step raises (a sleep of -1 s): the trial's MLflow run is FAILED and keeps the
    error; a sweep in which no trial finished is an error naming it."""
    tune = TuneConfig(
        trials=1, concurrency=1, scheduler="fifo", space={"model.params.step_seconds": "choice([-1.0])"}
    )
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "sweep-test", tmp_path / "artifacts")
    parent = tracker.start_run("sweep")
    with pytest.raises(UserError, match=r"no trial reported 'valid_loss'.*sleep length must be non-negative"):
        run_sweep(
            tune,
            SLOW_MLP,
            TrainConfig(epochs=1),
            iris,
            tracker=tracker,
            parent_run_id=parent,
            storage_path=tmp_path / "ray",
            run_name="sweep",
        )
    (run,) = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert run.info.status == "FAILED"
    assert "sleep length must be non-negative" in run.data.tags["raylens.error"]
    error_file = tracker.client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
    traceback = Path(error_file).read_text()
    assert (
        'slow_models.py", line' in traceback and "ValueError: sleep length must be non-negative" in traceback
    )
    assert "\x1b[" not in traceback  # no terminal colour codes in a file
