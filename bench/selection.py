"""Algorithm selection beside tuning each family alone, on scikit-learn's breast_cancer and digits
and a synthetic regression: one TPE sweep of 12 trials across five candidates (logistic or linear
regression, random forest, histogram gradient boosting, k-NN, an MLP), each with its own space;
and, with the same budget, each candidate tuned alone (12 trials, TPE). Per data set: the
selection's winner against the best model any candidate reached alone (validation metric; the
target is within 1 %), and the selection's wall time against tuning the winning candidate alone
(the target is at most twice). Two trials at a time on a Ray of 2 CPUs; trials of 5 epochs (stages).
``ratio``: the largest of the three time ratios (printed last).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

TRIALS = 12
DATA = {
    "breast_cancer": ("sklearn:breast_cancer", "valid_accuracy"),
    "digits": ("sklearn:digits", "valid_accuracy"),
    "regression": ("synthetic:regression?rows=3000&features=20&seed=0", "valid_r2"),
}


def candidates(task: str) -> list[dict[str, Any]]:
    linear = (
        {
            "model": {"family": "sklearn", "name": "logistic_regression"},
            "space": {"model.params.C": "loguniform(1e-3, 1e2)"},
        }
        if task == "classification"
        else {
            "model": {"family": "sklearn", "name": "sgd"},
            "space": {"model.params.alpha": "loguniform(1e-6, 1e-1)"},
        }
    )
    return [
        linear,
        {
            "model": {"family": "sklearn", "name": "random_forest", "params": {"n_estimators": 50}},
            "space": {
                "model.params.max_depth": "randint(2, 16)",
                "model.params.min_samples_leaf": "randint(1, 10)",
            },
        },
        {
            "model": {"family": "sklearn", "name": "hist_gradient_boosting", "params": {"max_iter": 60}},
            "space": {
                "model.params.learning_rate": "loguniform(1e-2, 5e-1)",
                "model.params.max_depth": "randint(2, 8)",
            },
        },
        {
            "model": {"family": "sklearn", "name": "knn"},
            "space": {"model.params.n_neighbors": "randint(1, 30)"},
        },
        {
            "model": {"family": "torch", "name": "mlp", "params": {"hidden": [64]}},
            "space": {"train.optimizer.lr": "loguniform(1e-4, 3e-2)"},
        },
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from raylens.features import DataConfig, FeaturesConfig, build_feature_set
    from raylens.trainer import TorchModelConfig, TrainConfig
    from raylens.trainer.tracking import NullTracker
    from raylens.tuning import TuneConfig
    from raylens.tuning.sweep import run_sweep

    trials = 4 if args.quick else TRIALS
    train = TrainConfig(epochs=5, batch_size=32)
    out: dict[str, Any] = {}
    ratios = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for name, (source, metric) in DATA.items():
                fs = build_feature_set(
                    name,
                    DataConfig(source=source, target="target", split={"valid": 0.2, "test": 0.2}),
                    FeaturesConfig(transforms=[{"standardize": "*"}]),
                    root / "fs",
                )
                pool = candidates(fs.task)

                def tuned(
                    chosen: list[dict[str, Any]],
                    folder: str,
                    fs: Any = fs,
                    metric: str = metric,
                    name: str = name,
                ) -> tuple[float, str, float]:
                    """(best validation metric, its candidate, wall seconds) of a TPE sweep."""
                    config = TuneConfig(
                        trials=trials,
                        concurrency=2,
                        search="tpe",
                        scheduler="fifo",
                        metric=metric,
                        mode="max",
                        candidates=chosen,
                    )
                    tracker = NullTracker()
                    began = time.perf_counter()
                    result = run_sweep(
                        config,
                        TorchModelConfig(),
                        train,
                        fs,
                        tracker=tracker,
                        parent_run_id="bench",
                        storage_path=root / name / folder,
                        run_name="sweep",
                    )
                    seconds = time.perf_counter() - began
                    assert result.leaderboard is not None and result.leaderboard.winner is not None
                    winner = result.leaderboard.winner
                    return winner.score, winner.candidate, seconds

                score, winner, seconds = tuned(pool, "selection")
                alone = {}
                for index, candidate in enumerate(pool):
                    alone_score, label, alone_seconds = tuned([candidate], f"alone-{index}")
                    alone[label] = (alone_score, alone_seconds)
                best_alone = max(s for s, _ in alone.values())
                ratio = seconds / alone[winner][1]
                ratios.append(ratio)
                out[name] = {
                    "metric": metric,
                    "winner": winner,
                    "winner_score": score,
                    "best_alone_score": best_alone,
                    "gap": (best_alone - score) / abs(best_alone),
                    "selection_s": seconds,
                    "winner_alone_s": alone[winner][1],
                    "alone": {label: {"score": s, "seconds": t} for label, (s, t) in alone.items()},
                    "time_ratio": ratio,
                }
    finally:
        ray.shutdown()
    return {**out, "ratio": max(ratios)}
