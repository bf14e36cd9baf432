"""Sweeps on real Ray Tune, tracked in a real MLflow (SQLite) store."""

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from ray.tune.experiment import Experiment

from raylens.errors import UserError
from raylens.features import FeatureSet
from raylens.trainer import (
    Batches,
    ScalingConfig,
    TorchModelConfig,
    TrainConfig,
    TrainJob,
    build_model,
    evaluate,
)
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


def test_pbt_clones_a_checkpoint_of_a_trial_of_several_workers_into_a_new_ray_train_run(
    iris: FeatureSet, tmp_path: Path
) -> None:
    """A trial of several workers is a Ray Train run of its own (the final training uses the same
    bridge): 2 DDP workers over gloo report every epoch once, keep the latest
    ``checkpoints_to_keep`` checkpoints of the full unwrapped model, and report the validation
    metrics of the whole split (scored in shards, all-reduced). Under PBT each epoch goes to Tune
    with the checkpoint Ray Train persisted; the trailing trial goes on from the leader's epoch-1
    checkpoint, its learning rate perturbed, in a Ray Train run of its own starting at epoch 2."""
    tune = TuneConfig(
        trials=2,
        concurrency=2,
        workers_per_trial=2,
        scheduler="pbt",
        grace_period=1,
        seed=3,
        space={"train.optimizer.lr": "loguniform(1e-4, 1e-1)"},
    )
    # Half a CPU a worker: the population (2 trials of 2 workers) and a CPU of headroom fit in 4.
    train = TrainConfig(
        epochs=2, batch_size=8, checkpoints_to_keep=2, scaling=ScalingConfig(cpus_per_worker=0.5)
    )
    model = TorchModelConfig(params={"hidden": [16]})
    result, events, *_ = sweep(iris, tmp_path, tune, train, model)
    first = {e.trial_id: e.config["train.optimizer.lr"] for e in reversed(events) if e.kind == "started"}
    assert len(first) == 2 and all(t.status == "completed" for t in result.trials)
    (exploited,) = [t for t in result.trials if t.config["train.optimizer.lr"] != first[t.trial_id]]
    (leader,) = [t for t in result.trials if t is not exploited]
    assert exploited.config["train.optimizer.lr"] not in first.values()  # perturbed, not copied
    for trial in result.trials:  # each epoch once, the exploited trial's going on from epoch 1
        reported = [e.metrics for e in events if e.kind == "result" and e.trial_id == trial.trial_id]
        assert [m["epoch"] for m in reported] == [1.0, 2.0]

    def kept(run: Path) -> list[Path]:
        return sorted(p for p in run.glob("checkpoint_*") if p.is_dir())

    trials = tmp_path / "ray" / "trials"
    (cloned,) = [p for p in trials.glob(f"*{exploited.trial_id}-*")]
    assert [load_checkpoint(c)["epoch"] for c in kept(cloned)] == [2]
    # Tune holds a copy of the checkpoint reported with the last epoch.
    (trial_folder,) = (tmp_path / "ray" / "sweep").glob(f"_distributed_trial_{exploited.trial_id}_*")
    assert max(load_checkpoint(c)["epoch"] for c in trial_folder.glob("checkpoint_*")) == 2

    first_run = trials / f"sweep-{leader.trial_id}"
    assert (first_run / "checkpoint_manager_snapshot.json").is_file()  # Ray Train's own record of the run
    # Both epochs' checkpoints, or only epoch 1's where PBT paused the leader at epoch 1 before
    # the workers saved epoch 2 (it pauses the leader too, with the trials' timing); the leader
    # then goes on from epoch 1 in a second run.
    assert [load_checkpoint(c)["epoch"] for c in kept(first_run)] in ([1], [1, 2])
    runs = list(trials.glob(f"sweep-{leader.trial_id}*"))
    state = load_checkpoint(max((c for run in runs for c in kept(run)), key=lambda c: c.name))
    assert state["epoch"] == 2 and state["model"]["net.0.weight"].shape == torch.Size([16, 4])
    assert not any(key.startswith("module.") for key in state["model"])
    job = TrainJob.for_feature_set(model, train, iris)
    net = build_model(job.model, job.in_features, job.task.out_features)
    net.load_state_dict(state["model"])
    valid = iris.read("valid")
    whole = evaluate(net, Batches.from_numpy(valid.x, valid.y), job.task)
    assert leader.metrics["valid_loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert leader.metrics["valid_accuracy"] == pytest.approx(whole["accuracy"])


def test_a_failing_trial_is_a_failed_run_with_its_error(iris: FeatureSet, tmp_path: Path) -> None:
    """Its training step raises (a sleep of -1 s): the trial's MLflow run is FAILED and keeps the
    error; a sweep in which no trial finished is an error naming it."""
    tune = TuneConfig(
        trials=1, concurrency=1, scheduler="fifo", space={"model.params.step_seconds": "choice([-1.0])"}
    )
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "sweep-test", tmp_path / "artifacts")
    parent = tracker.start_run("sweep")
    events: list[TrialEvent] = []
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
            on_event=events.append,
        )
    (failed,) = [event for event in events if event.kind == "failed"]
    assert failed.error == "ValueError: sleep length must be non-negative"  # the live view's line
    (run,) = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert run.info.status == "FAILED"
    assert "sleep length must be non-negative" in run.data.tags["raylens.error"]
    error_file = tracker.client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
    traceback = Path(error_file).read_text()
    assert (
        'slow_models.py", line' in traceback and "ValueError: sleep length must be non-negative" in traceback
    )
    assert "\x1b[" not in traceback  # no terminal colour codes in a file


def test_pbt_refuses_a_population_that_cannot_run_at_once(iris: FeatureSet, tmp_path: Path) -> None:
    """PBT waits at each perturbation for the whole population: trials that cannot start would
    leave it waiting forever. Refused before any trial starts, nothing written."""
    tune = TuneConfig(
        trials=5, concurrency=5, scheduler="pbt", space={"train.optimizer.lr": "loguniform(1e-4, 1e-1)"}
    )
    refused = r"pbt trains its whole population \(tune\.trials: 5\) at once, but 4 run at a time"
    with pytest.raises(UserError, match=refused):
        sweep(iris, tmp_path, tune, TrainConfig(epochs=2))
    assert not (tmp_path / "ray").exists()


def test_a_goal_ends_the_sweep_at_the_first_result_that_meets_it(iris: FeatureSet, tmp_path: Path) -> None:
    """tune.goal: the trial that meets it ends at that epoch and wins; the trial running beside
    it is stopped; none starts after it. Both trials' runs are finished, not left killed (Tune
    ends them without its trial-complete callback)."""
    tune = TuneConfig(
        trials=4,
        concurrency=2,
        search="grid",
        scheduler="fifo",
        metric="valid_accuracy",
        mode="max",
        goal=0.9,
        space={"train.optimizer.lr": "choice([0.0001, 0.05, 0.0002, 0.0003])"},
    )
    train = TrainConfig(epochs=30, batch_size=16)
    model = SLOW_MLP.model_copy(update={"params": {"hidden": [8], "step_seconds": 0.02}})
    result, events, tracker, parent = sweep(iris, tmp_path, tune, train, model)

    slow, fast = result.trials
    assert [t.config["train.optimizer.lr"] for t in result.trials] == [0.0001, 0.05]
    assert fast.status == "completed" and fast.metrics["valid_accuracy"] >= 0.9
    assert result.best_config == {"train.optimizer.lr": 0.05} and result.best_metrics == fast.metrics
    # (On a busy machine the slow trial may not have reported an epoch yet: stopped at 0.)
    assert slow.status == "stopped" and slow.stopped_at == slow.metrics.get("epoch", 0) < 30
    ended = {e.trial_id: e for e in events if e.kind == "completed"}
    assert (ended[fast.trial_id].reached_goal, ended[fast.trial_id].stopped_early) == (True, False)
    assert slow.trial_id not in ended or not ended[slow.trial_id].reached_goal

    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_trial = {run.data.tags["raylens.trial_id"]: run for run in runs}
    assert fast.trial_id in by_trial and set(by_trial) <= {slow.trial_id, fast.trial_id}
    assert all(run.info.status == "FINISHED" for run in runs)
    assert by_trial[fast.trial_id].data.tags["raylens.reached_goal"] == "true"
    accuracy = tracker.client.get_metric_history(by_trial[fast.trial_id].info.run_id, "valid_accuracy")
    assert [m.value >= 0.9 for m in accuracy] == [False] * (len(accuracy) - 1) + [True]
    assert len(accuracy) == fast.metrics["epoch"] < 30
