"""Early stopping and Bayesian search on a real small task: an MLP on scikit-learn's digits, its
learning rate, dropout and weight decay searched, 16 trials of up to 10 epochs, one at a time
(so the order of reports, and the count, is the same on any machine). Over 5 seeds:

- epochs to target: the epochs a sweep trains (all trials, in order) until one reports the
  target validation accuracy — random search with ASHA (raylens' defaults: grace period 1,
  reduction factor 2) beside the same configurations without early stopping
  (``ratio``: ASHA ÷ random, median over seeds; the target is ≤ 1/3);
- trials to target: how many trials TPE (Optuna) starts until one reaches it, beside random
  search (``tpe_trial_share``: TPE ÷ random, median over seeds; the target is < 1).

A sweep that never reaches the target counts all it spent, plus one trial. ``ratio`` is the
ASHA epoch share (printed last).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

TARGET = 0.97
REDUCTION = 2.0
SEEDS = 5
SPACE = {
    "train.optimizer.lr": "loguniform(1e-5, 10)",
    "model.params.dropout": "uniform(0, 0.9)",
    "train.optimizer.weight_decay": "loguniform(1e-6, 1)",
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from raylens.features import DataConfig, FeaturesConfig, build_feature_set
    from raylens.trainer import TorchModelConfig, TrainConfig
    from raylens.trainer.tracking import NullTracker
    from raylens.tuning import TuneConfig
    from raylens.tuning.sweep import run_sweep
    from raylens.tuning.tracking import TrialEvent

    seeds = 2 if args.quick else SEEDS
    model = TorchModelConfig(params={"hidden": [64]})
    train = TrainConfig(epochs=10, batch_size=64)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            fs = build_feature_set(
                "asha-bench",
                DataConfig(source="sklearn:digits", target="target", split={"valid": 0.2, "test": 0.2}),
                FeaturesConfig(transforms=[{"standardize": "*"}]),
                root / "fs",
            )

            def to_target(seed: int, search: str, scheduler: str) -> tuple[int, int]:
                """(epochs, trials) the sweep spent until a report reached the target."""
                events: list[TrialEvent] = []
                config = TuneConfig(
                    trials=16,
                    concurrency=1,
                    search=search,  # type: ignore[arg-type]
                    scheduler=scheduler,  # type: ignore[arg-type]
                    metric="valid_accuracy",
                    mode="max",
                    seed=seed,
                    reduction_factor=REDUCTION,
                    space=SPACE,
                )
                tracker = NullTracker()
                run_sweep(
                    config,
                    model,
                    train,
                    fs,
                    tracker=tracker,
                    parent_run_id=tracker.start_run("sweep"),
                    storage_path=root / f"{search}-{scheduler}-{seed}",
                    run_name="sweep",
                    on_event=events.append,
                )
                epochs, trials = 0, []
                for event in events:
                    if event.kind != "result":
                        continue
                    epochs += 1
                    if event.trial_id not in trials:
                        trials.append(event.trial_id)
                    if event.metrics.get("valid_accuracy", 0.0) >= TARGET:
                        return epochs, len(trials)
                return epochs + train.epochs, len(trials) + 1

            rows = []
            for seed in range(seeds):
                random_epochs, random_trials = to_target(seed, "random", "fifo")
                asha_epochs, _ = to_target(seed, "random", "asha")
                _, tpe_trials = to_target(seed, "tpe", "fifo")
                rows.append((random_epochs, asha_epochs, random_trials, tpe_trials))
    finally:
        ray.shutdown()
    epoch_share = statistics.median(asha / fifo for fifo, asha, _, _ in rows)
    trial_share = statistics.median(tpe / rand for _, _, rand, tpe in rows)
    return {
        "target_valid_accuracy": TARGET,
        "seeds": seeds,
        "random_epochs_to_target": [r[0] for r in rows],
        "asha_epochs_to_target": [r[1] for r in rows],
        "random_trials_to_target": [r[2] for r in rows],
        "tpe_trials_to_target": [r[3] for r in rows],
        "tpe_trial_share": trial_share,
        "ratio": epoch_share,
    }
