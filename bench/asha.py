"""Early stopping and Bayesian search on a real small task: an MLP on scikit-learn's digits, its
learning rate, dropout and weight decay searched, up to 96 trials of up to 30 epochs, one at a
time (so the order of reports is the same on any machine). Over 5 seeds:

- epochs to target: the epochs a sweep trains (all trials, in order) until one reports the
  target validation accuracy — random search with ASHA (raylens' defaults: grace period 1,
  reduction factor 2) beside the same configurations without early stopping
  (``ratio``: ASHA ÷ random, median over seeds; the target is ≤ 1/3);
- trials to target: how many trials TPE (Optuna) starts until one reaches it, beside random
  search (``tpe_trial_share``: TPE ÷ random, median over seeds; the target is < 1).

Neither ASHA's decisions nor the searchers depend on the target, so each sweep runs once, until
a trial reaches the highest of ``TARGETS`` (``tune.goal``: what comes after cannot change any
figure), and is read for every target: how much early stopping saves depends on how rare the
target is among the space's configurations, and the figures show it. ``TARGET`` is the one the
printed ratios are for: a score near the best the space holds, which random search reaches in
every seed within its 96 trials. How a seed where a sweep never reaches a target counts:
``compared``. ``ratio`` is the ASHA epoch share at ``TARGET`` (printed last).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

TARGETS = (0.97, 0.975, 0.98)
TARGET = 0.98
TRIALS = 96
EPOCHS = 30
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
    trials = 8 if args.quick else TRIALS
    model = TorchModelConfig(params={"hidden": [64]})
    train = TrainConfig(epochs=EPOCHS, batch_size=64)
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

            def reports(seed: int, search: str, scheduler: str) -> list[tuple[str, float]]:
                """(trial, validation accuracy) of every report of the sweep, in order."""
                events: list[TrialEvent] = []
                config = TuneConfig(
                    trials=trials,
                    concurrency=1,
                    search=search,  # type: ignore[arg-type]
                    scheduler=scheduler,  # type: ignore[arg-type]
                    metric="valid_accuracy",
                    mode="max",
                    seed=seed,
                    reduction_factor=REDUCTION,
                    space=SPACE,
                    goal=max(TARGETS),
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
                return [
                    (event.trial_id, float(event.metrics.get("valid_accuracy", 0.0)))
                    for event in events
                    if event.kind == "result"
                ]

            kinds = (("random", "fifo"), ("random", "asha"), ("tpe", "fifo"))
            sweeps = [[reports(seed, *kind) for kind in kinds] for seed in range(seeds)]
    finally:
        ray.shutdown()
    for seed, (random_search, asha, _) in enumerate(sweeps):
        if not curves_are_prefixes(asha, random_search):  # what ``compared`` counts on
            raise RuntimeError(f"seed {seed}: a trial under ASHA reported values random search did not")
    by_target = {str(target): compared(sweeps, target, trials) for target in TARGETS}
    headline = by_target[str(TARGET)]
    return {
        "target_valid_accuracy": TARGET,
        "seeds": seeds,
        "trials": trials,
        "epochs": EPOCHS,
        "by_target": by_target,
        "tpe_trial_share": headline["tpe_trial_share"],
        "ratio": headline["asha_epoch_share"],
    }


def compared(sweeps: list[list[list[tuple[str, float]]]], target: float, trials: int) -> dict[str, Any]:
    """ASHA's and TPE's spend to ``target`` beside random search's, seed by seed, and the medians.

    ASHA trains the same configurations as random search, each a prefix of its curve (the same
    seed, the same rows, the same steps), so where random search never reaches the target ASHA
    does not either: that seed says nothing of early stopping and is left out of the median.
    Where random search reaches it and ASHA does not, ASHA stopped every trial that would have:
    its share is infinite (``None`` in the list). A searcher that never reaches the target counts
    ``trials + 1`` trials, so TPE and random search that both miss it share 1.
    """
    random_epochs, asha_epochs, random_trials, tpe_trials, epoch_shares, trial_shares = [], [], [], [], [], []
    for random_search, asha, tpe in sweeps:
        by_random, by_asha, by_tpe = (to_target(reports, target) for reports in (random_search, asha, tpe))
        random_epochs.append(by_random and by_random[0])
        asha_epochs.append(by_asha and by_asha[0])
        random_trials.append(by_random[1] if by_random else trials + 1)
        tpe_trials.append(by_tpe[1] if by_tpe else trials + 1)
        trial_shares.append(tpe_trials[-1] / random_trials[-1])
        if by_random:
            epoch_shares.append(by_asha[0] / by_random[0] if by_asha else math.inf)
    epoch_share = statistics.median(epoch_shares) if epoch_shares else math.inf
    return {
        "random_epochs_to_target": random_epochs,
        "asha_epochs_to_target": asha_epochs,
        "random_trials_to_target": random_trials,
        "tpe_trials_to_target": tpe_trials,
        "seeds_compared": len(epoch_shares),
        "asha_epoch_shares": [share if math.isfinite(share) else None for share in epoch_shares],
        "tpe_trial_share": statistics.median(trial_shares),
        "asha_epoch_share": epoch_share if math.isfinite(epoch_share) else None,
    }


def curves_are_prefixes(asha: list[tuple[str, float]], random_search: list[tuple[str, float]]) -> bool:
    """Whether each trial's reports under ASHA begin its reports under random search (trials
    matched by their number: the two sweeps' ids differ in their prefix alone), over the trials
    both ran (each sweep ends at tune.goal, ASHA's often after random search's)."""

    from raylens.tuning.halving import trial_number

    def curves(reports: list[tuple[str, float]]) -> dict[int, list[float]]:
        by_trial: dict[int, list[float]] = {}
        for trial, accuracy in reports:
            by_trial.setdefault(trial_number(trial), []).append(accuracy)
        return by_trial

    full = curves(random_search)
    return all(full[trial][: len(curve)] == curve for trial, curve in curves(asha).items() if trial in full)


def to_target(reports: list[tuple[str, float]], target: float) -> tuple[int, int] | None:
    """(epochs, trials) a sweep spent until a report reached ``target``; None if none did."""
    trials: list[str] = []
    for spent, (trial, accuracy) in enumerate(reports, start=1):
        if trial not in trials:
            trials.append(trial)
        if accuracy >= target:
            return spent, len(trials)
    return None
