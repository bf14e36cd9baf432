"""Steady-state training throughput: raylens ÷ a bare PyTorch loop doing the same work.

Reported for 1 worker and ``auto`` (the ratio printed last is the smaller of the two), and for
DDP x2 and FSDP x2; also the training FLOP/s reached, beside ``torch.mm``'s on the same cores.

Both train the same MLP on the same rows with the same batch size and cores, and both score the
validation split after every epoch (what any training loop does); raylens also writes a checkpoint
and reports through Ray Train every epoch. Throughput is the median over epochs of training rows
per second of wall time, epoch end to epoch end, so start-up is left out of both; raylens is
timed at the driver, from the epoch reports it receives. The machine is shared and noisy, so the
bare loop runs before, between and after the raylens runs, and each raylens figure is compared
with the mean of the bare runs beside it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.data import synthetic_feature_set
from raylens.cluster.runtime import RuntimeSettings, start_ray, stop_ray
from raylens.features import FeatureSet
from raylens.trainer import TaskSpec, TorchModelConfig, TrainConfig, TrainJob, build_model
from raylens.trainer.outputs import loss_fn
from raylens.trainer.ray_train import train_distributed
from raylens.trainer.torch_family import node_layout

HIDDEN = [256, 256]
BATCH = 256
LR = 1e-3


def training_flop_per_sample(hidden: list[int], features: int, classes: int) -> int:
    """Multiply-adds of the MLP's Linear layers x 2 FLOPs, forward (1x) and backward (2x: the
    gradients of inputs and weights; the first layer's inputs need none)."""
    widths = [features, *hidden, classes]
    weights = [a * b for a, b in itertools.pairwise(widths)]
    return 2 * (3 * sum(weights) - weights[0])


def mm_peak_flops(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """What ``torch.mm`` of float32 square matrices reaches on ``threads`` threads: the best of
    ``repeats`` timings, FLOP/s."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _median_rate(rows: int, ends: list[float]) -> float:
    return rows / statistics.median(b - a for a, b in itertools.pairwise(ends))


def bare_loop(fs: FeatureSet, threads: int, epochs: int) -> float:
    """The baseline: what a user writes by hand with the same model and data. Samples/s."""
    torch.set_num_threads(threads)
    train, valid = fs.read("train"), fs.read("valid")
    x, y = torch.from_numpy(train.x.copy()), torch.from_numpy(train.y.copy())
    x_valid, y_valid = torch.from_numpy(valid.x.copy()), torch.from_numpy(valid.y.copy())
    task = TaskSpec("classification", num_classes=fs.num_outputs)
    torch.manual_seed(0)
    model = build_model(TorchModelConfig(params={"hidden": HIDDEN}), x.shape[1], task.out_features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ends = [time.perf_counter()]
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for begin in range(0, len(order), BATCH):
            index = order[begin : begin + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[index]), y[index], task).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            outputs = torch.cat([model(x_valid[i : i + 4096]) for i in range(0, len(x_valid), 4096)])
            float(loss_fn(outputs, y_valid, task))
        ends.append(time.perf_counter())
    return _median_rate(len(y), ends[1:])


RUNS = {
    "1_worker": {"workers": 1, "strategy": "auto"},
    "auto": {"workers": 2, "strategy": "auto"},
    "ddp_2": {"workers": 2, "strategy": "ddp"},
    "fsdp_2": {"workers": 2, "strategy": "fsdp"},
}
"""What is compared with the bare loop, each on all the machine's cores, as ``raylens train``
runs it on embedded Ray: 1 worker trains in the raylens process; ``auto`` with 2 workers too (one
machine: one process with both workers' CPUs); DDP and FSDP in 2 Ray Train workers."""


def raylens_run(fs: FeatureSet, name: str, cores: int, epochs: int, storage: Path) -> float:
    scaling = RUNS[name]
    workers = int(scaling["workers"])
    train = TrainConfig(
        epochs=epochs,
        batch_size=BATCH,
        optimizer={"lr": LR},
        scaling={**scaling, "cpus_per_worker": cores / workers},
    )
    job, _ = node_layout(
        TrainJob.for_feature_set(TorchModelConfig(params={"hidden": HIDDEN}), train, fs), embedded=True
    )
    ends: list[float] = []
    ranks = job.train.scaling.max_workers
    rows = (fs.manifest.rows["train"] // ranks) * ranks
    train_distributed(
        job,
        fs,
        run_name=f"bench-{name}-{time.monotonic_ns()}",
        storage_path=storage,
        on_epoch=lambda metrics: ends.append(time.perf_counter()),
        embedded=True,
    )
    return _median_rate(rows, ends)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    rows, epochs, repeats = (20_000, 4, 1) if args.quick else (200_000, 6, 2)
    with tempfile.TemporaryDirectory() as tmp:
        fs = synthetic_feature_set(rows, Path(tmp) / "features")
        runtime = start_ray(RuntimeSettings.build())
        try:
            results: dict[str, Any] = {
                "rows_train": fs.manifest.rows["train"],
                "rows_valid": fs.manifest.rows["valid"],
                "model": f"mlp {HIDDEN}",
                "batch_size": BATCH,
                "cores": cores,
                "epochs": epochs,
            }
            # bare, 1 worker, bare, auto, bare, ...: every raylens run has a bare run on each side.
            bare = [bare_loop(fs, cores, epochs)]
            measured: dict[str, list[float]] = {name: [] for name in RUNS}
            ratios: dict[str, list[float]] = {name: [] for name in RUNS}
            for name in list(RUNS) * repeats:
                rate = raylens_run(fs, name, cores, epochs, Path(tmp) / "ray")
                bare.append(bare_loop(fs, cores, epochs))
                measured[name].append(rate)
                ratios[name].append(rate / statistics.mean(bare[-2:]))
        finally:
            stop_ray(runtime)
    results["bare_samples_per_s"] = [round(b) for b in bare]
    for name in RUNS:
        results[f"raylens_{name}_samples_per_s"] = [round(r) for r in measured[name]]
    # FLOP/s of training (validation's share of each epoch's wall time is left in: a lower bound).
    per_sample = training_flop_per_sample(HIDDEN, 64, 10)
    peak = mm_peak_flops(cores)
    results["train_flop_per_sample"] = per_sample
    results["mm_peak_gflop_per_s"] = round(peak / 1e9, 1)
    results["bare_gflop_per_s"] = round(statistics.median(bare) * per_sample / 1e9, 1)
    results["raylens_1_worker_gflop_per_s"] = round(
        statistics.median(measured["1_worker"]) * per_sample / 1e9, 1
    )
    results["raylens_1_worker_fraction_of_mm_peak"] = round(
        statistics.median(measured["1_worker"]) * per_sample / peak, 3
    )
    for name in RUNS:
        results[f"ratio_{name}"] = statistics.median(ratios[name])
    results["ratio"] = min(results["ratio_1_worker"], results["ratio_auto"])
    return results
