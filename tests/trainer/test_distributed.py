"""DDP, FSDP and pipeline numerics in 2 gloo processes (``tests/trainer/gloo.py``, no Ray): the
same losses and model as one process, replicas in step, and a resumed run — with dropout, from
whole or sharded checkpoints — bit-identical to an uninterrupted one."""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raylens.features import FeatureSet, SplitArrays
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob, run_worker
from raylens.trainer.debug.debugger import STEPS_FILE, rows_of
from raylens.trainer.decisions import GO_ON, Action, Decision
from raylens.trainer.job import shard_rows
from raylens.trainer.loop import StepView
from raylens.trainer.parallel.checkpoint import ATTACHMENTS
from tests.conftest import iris_feature_set
from tests.trainer.gloo import Collect, Ranks, run_ranks


def make_job(
    fs: FeatureSet,
    strategy: str,
    *,
    epochs: int,
    batch_size: int,
    dropout: float = 0.0,
    workers: int = 2,
    schedule: str = "1f1b",
    eval_every_steps: int | None = None,
    debug: dict[str, Any] | None = None,
) -> TrainJob:
    """``batch_size`` is per data-parallel rank: a pipeline's stages share one batch of twice
    that (2 microbatches), so every strategy steps over the same rows."""
    pipelined = strategy == "pipeline"
    return TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16, 16], "dropout": dropout}),
        TrainConfig(
            epochs=epochs,
            batch_size=batch_size * 2 if pipelined else batch_size,
            optimizer={"lr": 0.05},
            eval_every_steps=eval_every_steps,
            scaling={
                "workers": workers,
                "strategy": strategy,
                "pipeline": {"microbatches": 2, "schedule": schedule},
            },
            **({"debug": debug} if debug is not None else {}),
        ),
        fs,
    )


def scenarios(ranks: Ranks, jobs: dict[str, dict[str, TrainJob]]) -> dict[str, dict[str, Any]]:
    """Every strategy's scenario, one after the other in the same two processes (one launch)."""
    return {strategy: scenario(ranks, strategy_jobs) for strategy, strategy_jobs in jobs.items()}


def scenario(ranks: Ranks, jobs: dict[str, TrainJob]) -> dict[str, Any]:
    """Runs in every rank: one full-batch run, then an uninterrupted dropout run, and the same run
    stopped after 2 epochs and resumed from that checkpoint."""
    full = ranks.train(jobs["full_batch"])
    steps = ranks.train(jobs["steps"])
    gpipe = ranks.train(jobs["steps_gpipe"]).metrics if "steps_gpipe" in jobs else None
    straight = ranks.train(jobs["dropout"])
    half = ranks.train(jobs["dropout_half"])
    # Rank 0 holds the whole checkpoint (FSDP gathers onto it); every rank resumes from it, as
    # every Ray Train worker reads the checkpoint rank 0 saved.
    shared = [half.states[-1]]
    dist.broadcast_object_list(shared, src=0)
    torch.manual_seed(ranks.rank + 777)  # whatever the process drew in between must not matter
    resumed = ranks.train(jobs["dropout"], resume_from=shared[0])
    # Mid-epoch: resumed from the checkpoint of the 5th report (a mid-epoch one, in epoch 2).
    mid_straight = ranks.train(jobs["mid_epoch"])
    shared = [mid_straight.states[4]]
    dist.broadcast_object_list(shared, src=0)
    mid_resumed = ranks.train(jobs["mid_epoch"], resume_from=shared[0])
    # Only rank 1 decides to stop, at step 5: both ranks must stop there, neither left waiting.
    stopped = ranks.train(jobs["dropout"], monitors=[StopAtStep(5 if ranks.rank == 1 else None)])
    # Rank 1's batches take 30 ms longer to load: the debugger's load_imbalance rule stops both.
    slow = (
        ranks.train(jobs["slow"], heartbeat=SlowBatches(0.03 if ranks.rank == 1 else 0.0))
        if "slow" in jobs
        else None
    )
    timed = ranks.train(jobs["timed"]) if "timed" in jobs else None
    return {
        "full": _last(full, jobs["full_batch"]),
        "steps": steps.metrics,
        "steps_gpipe": gpipe,
        "straight": _last(straight, jobs["dropout"]),
        "resumed": _last(resumed, jobs["dropout"]),
        "stopped": stopped.result,
        "slow": slow.result if slow is not None else None,
        "timed": rows_of(timed.states[-1][ATTACHMENTS][STEPS_FILE]) if timed is not None else None,
        "mid_epoch": {
            "at": shared[0]["step"],
            "straight": _last(mid_straight, jobs["mid_epoch"]),
            "resumed": _last(mid_resumed, jobs["mid_epoch"]),
        },
    }


class SlowBatches:
    """A heartbeat that sleeps as each batch is loaded: a rank with a slow data path."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def beat(self, epoch: int, step: int, phase: int) -> None:
        if phase == 0 and self.seconds:
            time.sleep(self.seconds)

    def pause(self) -> None:
        pass


class StopAtStep:
    """A monitor that stops the run after step ``at`` (never, for None)."""

    every = 1

    def __init__(self, at: int | None) -> None:
        self.at = at

    def on_step(self, view: StepView) -> Decision:
        return Decision(Action.STOP, f"step {view.step}") if view.step == self.at else GO_ON

    def on_epoch(self, metrics: dict[str, float]) -> Decision:
        return GO_ON


def _last(run: Collect, job: TrainJob) -> dict[str, Any]:
    model = run.whole_model(job)
    return {"metrics": run.metrics, "model": model, "replica": run.replica, "rng": run.states[-1]["rng"]}


@pytest.fixture(scope="module")
def iris_module(tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    return iris_feature_set(tmp_path_factory.mktemp("iris"))


STRATEGIES = ("ddp", "fsdp", "pipeline")
STEP_BATCH = 9
"""Per data-parallel rank; 90 training rows make 5 whole steps of 18 rows an epoch, so every
strategy (and one process with batches of 18) takes the same steps over the same rows."""


@pytest.fixture(scope="module")
def launched(iris_module: FeatureSet, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Both strategies' scenarios, run in one launch of 2 gloo processes."""
    jobs = {
        strategy: {
            "full_batch": make_job(iris_module, strategy, epochs=3, batch_size=45),
            "steps": make_job(iris_module, strategy, epochs=3, batch_size=STEP_BATCH),
            "dropout": make_job(iris_module, strategy, epochs=4, batch_size=8, dropout=0.3),
            "dropout_half": make_job(iris_module, strategy, epochs=2, batch_size=8, dropout=0.3),
            "mid_epoch": make_job(
                iris_module, strategy, epochs=3, batch_size=8, dropout=0.3, eval_every_steps=2
            ),
        }
        for strategy in STRATEGIES
    }
    jobs["ddp"]["slow"] = make_job(
        iris_module,
        "ddp",
        epochs=2,
        batch_size=8,
        debug={"every": 2, "rules": {"load_imbalance": {"action": "stop", "factor": 3}}},
    )
    jobs["ddp"]["timed"] = make_job(iris_module, "ddp", epochs=1, batch_size=8, debug={"every": 2})
    jobs["pipeline"]["steps_gpipe"] = make_job(
        iris_module, "pipeline", epochs=3, batch_size=STEP_BATCH, schedule="gpipe"
    )
    results = run_ranks(
        partial(scenarios, jobs=jobs),
        iris_module.read("train"),
        iris_module.read("valid"),
        tmp_path_factory.mktemp("gloo"),
    )
    return jobs, results


@pytest.fixture(params=STRATEGIES)
def ranks(request: pytest.FixtureRequest, launched):  # type: ignore[no-untyped-def]
    """One strategy's jobs and what each rank returned for them."""
    jobs, results = launched
    return request.param, jobs[request.param], [rank[request.param] for rank in results]


def test_two_ranks_train_the_model_one_process_trains(ranks, iris_module: FeatureSet) -> None:  # type: ignore[no-untyped-def]
    """Full-batch steps: the gradient averaged over 2 equal shards is the gradient over their
    union, so 2 ranks must end where one process on the same rows ends."""
    _, _, results = ranks
    train = iris_module.read("train")
    union = np.sort(np.concatenate([shard_rows(len(train), r, 2, seed=0) for r in range(2)]))
    single = Collect()
    one_batch = make_job(iris_module, "ddp", epochs=3, batch_size=len(union), workers=1)
    run_worker(one_batch, SplitArrays(train.x[union], train.y[union]), iris_module.read("valid"), single)

    distributed = results[0]["full"]
    for name, tensor in single.states[-1]["model"].items():
        torch.testing.assert_close(distributed["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # Validation metrics (scored in shards and all-reduced under DDP) are the whole split's.
    for key in ("valid_loss", "valid_accuracy", "train_loss"):
        assert distributed["metrics"][-1][key] == pytest.approx(single.metrics[-1][key], rel=1e-5), key
    assert distributed["metrics"][-1]["valid_loss"] < distributed["metrics"][0]["valid_loss"]


def test_every_strategy_takes_the_steps_one_process_takes(ranks, iris_module: FeatureSet) -> None:  # type: ignore[no-untyped-def]
    """Same seed, same data order: 3 epochs of 5 steps of 18 rows each, as DDP x2 and FSDP x2
    (9 rows per rank), pipeline x2 (18 rows in 2 microbatches) and one process. The losses agree
    within 1e-5 (relative): only the order of floating-point sums differs."""
    strategy, _, results = ranks
    single = Collect()
    job = make_job(iris_module, "ddp", epochs=3, batch_size=2 * STEP_BATCH, workers=1)
    run_worker(job, iris_module.read("train"), iris_module.read("valid"), single)

    runs = [rank["steps"] for rank in results]
    if strategy == "pipeline":  # both schedules
        runs += [rank["steps_gpipe"] for rank in results]
    for run in runs:
        assert len(run) == 3, strategy
        for theirs, ours in zip(run, single.metrics, strict=True):
            for key in ("train_loss", "valid_loss", "valid_accuracy"):
                assert theirs[key] == pytest.approx(ours[key], rel=1e-5), (strategy, key, theirs["epoch"])
    assert single.metrics[-1]["train_loss"] < single.metrics[0]["train_loss"]


def test_every_rank_reports_the_same_metrics(ranks) -> None:  # type: ignore[no-untyped-def]
    _, _, results = ranks
    assert results[0]["straight"]["metrics"] == results[1]["straight"]["metrics"]
    strategy = ranks[0]
    if strategy == "ddp":  # DDP keeps a whole replica on each rank, and they stay identical
        replicas = [r["straight"]["replica"] for r in results]
        assert replicas[0].keys() == replicas[1].keys() == results[0]["straight"]["model"].keys()
        for name, tensor in replicas[0].items():
            assert torch.equal(tensor, replicas[1][name]), name


def test_resumed_with_dropout_equals_uninterrupted(ranks) -> None:  # type: ignore[no-untyped-def]
    """Each rank's dropout draws from its own generators; the checkpoint carries every rank's
    state, so the resumed run takes exactly the steps the uninterrupted one took."""
    _, _, results = ranks
    straight, resumed = results[0]["straight"], results[0]["resumed"]
    # The checkpoint holds each rank's generators, and they differ: each rank draws its own masks.
    rng = straight["rng"]
    assert len(rng) == 2 and all(set(state) == {"torch", "numpy", "python"} for state in rng)
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert [m["epoch"] for m in resumed["metrics"]] == [3.0, 4.0]
    assert straight["model"].keys() == resumed["model"].keys()
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for key in ("valid_loss", "valid_accuracy", "train_loss"):
        assert resumed["metrics"][-1][key] == straight["metrics"][-1][key], key


def test_resumed_mid_epoch_equals_uninterrupted(ranks) -> None:  # type: ignore[no-untyped-def]
    """eval_every_steps: 2 checkpoints mid-epoch; resumed from one in epoch 2 (its batches so far
    skipped, its loss sums carried over) the run ends as the uninterrupted one, bit for bit."""
    strategy, _, results = ranks
    mid = results[0]["mid_epoch"]
    assert mid["at"] == (8 if strategy == "pipeline" else 10)  # 5 or 6 steps an epoch
    straight, resumed = mid["straight"], mid["resumed"]
    timeless = [{k: v for k, v in m.items() if not k.endswith("_per_s")} for m in straight["metrics"]]
    assert resumed["metrics"] == timeless[5:]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_a_stop_decided_on_one_rank_stops_every_rank_at_that_step(ranks) -> None:  # type: ignore[no-untyped-def]
    _, _, results = ranks
    mine, other = results[1]["stopped"], results[0]["stopped"]
    assert (mine.stopped_at_step, other.stopped_at_step) == (5, 5)
    assert mine.stopped.reason == "step 5" and other.stopped.reason == "another worker stopped the run"
    assert mine.epochs == other.epochs == 0


def test_a_rank_with_slow_batches_is_a_load_imbalance_that_stops_every_rank(launched) -> None:  # type: ignore[no-untyped-def]
    _, results = launched
    first, second = results[0]["ddp"]["slow"], results[1]["ddp"]["slow"]
    assert first.stopped_at_step == second.stopped_at_step and first.stopped_at_step is not None
    assert first.stopped.rule == "load_imbalance" and "rank 1 spends" in first.stopped.reason
    assert second.stopped.reason == "another worker stopped the run"


def test_the_debugger_times_ddps_all_reduce_and_reads_the_step_signals_of_the_whole_model(launched) -> None:  # type: ignore[no-untyped-def]
    _, results = launched
    rows = results[0]["ddp"]["timed"]
    assert {row["rank"] for row in rows} == {0, 1}
    for row in rows:
        # The all-reduce overlaps backward: timed, and within it.
        assert 0 < row["communication"] <= row["backward"] + 1e-3, row
        assert math.isfinite(row["alpha"]) and row["gradient_noise"] > 0, row
    # Both ranks read the same signals: each summed over the ranks' (here identical) gradients.
    by_step = {}
    for row in rows:
        by_step.setdefault(row["step"], set()).add(round(row["alpha"], 6))
    assert all(len(alphas) == 1 for alphas in by_step.values())
