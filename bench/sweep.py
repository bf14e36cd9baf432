"""Sweep overhead: 32 trials of a 1-second trainable at concurrency 2 on 2 CPUs, the ideal being
16 s. Side by side in one run: plain Ray Tune (a function that sleeps 1 s and reports, actors
reused), raylens' sweep of the same trial (a scikit-learn estimator whose fit sleeps 1 s, through
the family, searcher, scheduler, leaderboard) without tracking, and with MLflow tracking (SQLite):
every trial a nested run with its params and metrics. ``ratio``: raylens tracked ÷ the ideal.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

TRIALS, CONCURRENCY, SECONDS = 32, 2, 1.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import tune

    from raylens.features import DataConfig, FeaturesConfig, build_feature_set
    from raylens.trainer import SklearnModelConfig, TrainConfig
    from raylens.trainer.tracking import MlflowTracker, NullTracker, Tracker
    from raylens.tuning import TuneConfig
    from raylens.tuning.sweep import run_sweep

    trials = 8 if args.quick else TRIALS
    ideal = trials / CONCURRENCY * SECONDS
    ray.init(address="local", num_cpus=CONCURRENCY, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            fs = build_feature_set(
                "sweep-bench",
                DataConfig(source="sklearn:iris", target="target"),
                FeaturesConfig(),
                root / "fs",
            )

            def sleeper(config: dict[str, Any]) -> None:
                time.sleep(SECONDS)
                tune.report({"valid_loss": config["alpha"]})

            began = time.perf_counter()
            tune.Tuner(
                tune.with_resources(sleeper, {"cpu": 1}),
                param_space={"alpha": tune.uniform(0, 1)},
                tune_config=tune.TuneConfig(
                    metric="valid_loss",
                    mode="min",
                    num_samples=trials,
                    max_concurrent_trials=CONCURRENCY,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(storage_path=str(root / "plain"), verbose=0),
            ).fit()
            plain = time.perf_counter() - began

            config = TuneConfig(
                trials=trials,
                concurrency=CONCURRENCY,
                scheduler="fifo",
                space={"model.params.alpha": "uniform(0, 1)"},
            )
            model = SklearnModelConfig(name="bench.sleepy:SleepyClassifier", params={"seconds": SECONDS})

            def raylens_sweep(tracker: Tracker, name: str) -> float:
                parent = tracker.start_run("sweep")
                began = time.perf_counter()
                run_sweep(
                    config,
                    model,
                    TrainConfig(epochs=1),
                    fs,
                    tracker=tracker,
                    parent_run_id=parent,
                    storage_path=root / name,
                    run_name="sweep",
                )
                seconds = time.perf_counter() - began
                tracker.end_run(parent)
                return seconds

            untracked = raylens_sweep(NullTracker(), "untracked")
            tracker = MlflowTracker(f"sqlite:///{root}/mlflow.db", "sweep-bench", root / "artifacts")
            tracked = raylens_sweep(tracker, "tracked")
    finally:
        ray.shutdown()
    return {
        "trials": trials,
        "concurrency": CONCURRENCY,
        "ideal_s": ideal,
        "ray_tune_s": plain,
        "raylens_s": untracked,
        "raylens_tracked_s": tracked,
        "tracking_cost": tracked / untracked - 1,
        "ratio": tracked / ideal,
    }
