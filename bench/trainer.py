"""Steady-state training throughput: raylens (Ray Train workers running the raylens loop, with
per-epoch validation, checkpoint and report) ÷ a bare PyTorch loop on the same model, data,
batch size and cores.

Throughput is counted from the end of the first epoch to the end of the last, so start-up is
left out of both; raylens is timed at the driver from the epoch reports it receives.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raylens.cluster.runtime import start_ray, stop_ray
from raylens.features import DataConfig, FeaturesConfig, FeatureSet, build_feature_set
from raylens.trainer import ModelConfig, TaskSpec, TrainConfig, TrainJob, build_model
from raylens.trainer.loop import loss_fn
from raylens.trainer.ray_train import train_distributed

HIDDEN = [256, 256]
BATCH = 256
LR = 1e-3


def bare_loop(fs: FeatureSet, threads: int, epochs: int) -> float:
    """The baseline: what a user writes by hand with the same model and data. Samples/s."""
    torch.set_num_threads(threads)
    train = fs.read("train")
    x, y = torch.from_numpy(train.x.copy()), torch.from_numpy(train.y.copy())
    task = TaskSpec("classification", num_classes=fs.num_outputs)
    torch.manual_seed(0)
    model = build_model(ModelConfig(params={"hidden": HIDDEN}), x.shape[1], task.out_features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ends = []
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for begin in range(0, len(order), BATCH):
            index = order[begin : begin + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[index]), y[index], task).backward()
            optimizer.step()
        ends.append(time.perf_counter())
    return len(y) * (epochs - 1) / (ends[-1] - ends[0])


def raylens_run(fs: FeatureSet, workers: int, cores: int, epochs: int, storage: Path) -> float:
    train = TrainConfig(
        epochs=epochs,
        batch_size=BATCH,
        optimizer={"lr": LR},
        scaling={"workers": workers, "strategy": "ddp", "cpus_per_worker": cores / workers},
    )
    job = TrainJob.for_feature_set(ModelConfig(params={"hidden": HIDDEN}), train, fs)
    ends: list[float] = []
    rows = (fs.manifest["rows"]["train"] // workers) * workers
    train_distributed(
        job,
        fs,
        run_name=f"bench-{workers}",
        storage_path=storage,
        on_epoch=lambda metrics: ends.append(time.perf_counter()),
    )
    return rows * (epochs - 1) / (ends[-1] - ends[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    rows, epochs = (20_000, 3) if args.quick else (200_000, 5)
    with tempfile.TemporaryDirectory() as tmp:
        fs = build_feature_set(
            "bench",
            DataConfig(
                source=f"synthetic:classification?rows={rows}&features=64&classes=10&seed=0", target="target"
            ),
            FeaturesConfig(transforms=[{"standardize": "*"}]),
            Path(tmp) / "features",
        )
        runtime = start_ray()
        try:
            results: dict[str, Any] = {
                "rows_train": fs.manifest["rows"]["train"],
                "model": f"mlp {HIDDEN}",
                "batch_size": BATCH,
                "cores": cores,
                "epochs": epochs,
            }
            results["bare_samples_per_s"] = bare_loop(fs, cores, epochs)
            for workers in (1, 2):
                results[f"raylens_{workers}w_samples_per_s"] = raylens_run(
                    fs, workers, cores, epochs, Path(tmp) / "ray"
                )
            # The bare loop again, after, so drift of the machine shows as a spread.
            results["bare_samples_per_s_after"] = bare_loop(fs, cores, epochs)
        finally:
            stop_ray(runtime)
    bare = max(results["bare_samples_per_s"], results["bare_samples_per_s_after"])
    results["ratio_1_worker"] = results["raylens_1w_samples_per_s"] / bare
    results["ratio_2_workers"] = results["raylens_2w_samples_per_s"] / bare
    results["ratio"] = min(results["ratio_1_worker"], results["ratio_2_workers"])
    return results
