"""A model too big for one worker's memory budget, trained two ways on 2 Ray Train workers:
pipeline (one stage per worker) and FSDP (parameters, gradients and optimizer state sharded).

The budget is set here (``BUDGET``): a replica's training state (16 bytes per parameter: float32
weights, gradients and Adam's two moments) does not fit in it, half of it does, so one worker or
DDP could not train the model and both strategies can. Throughput is the median epoch-to-epoch
rate at the driver, as in ``bench trainer``; the ratio printed last is pipeline ÷ FSDP.
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

from bench.data import synthetic_feature_set
from raylens.cluster.runtime import RuntimeSettings, start_ray, stop_ray
from raylens.features import FeatureSet
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob, build_model
from raylens.trainer.parallel.plan import STATE_BYTES_PER_PARAMETER
from raylens.trainer.ray_train import train_distributed

HIDDEN = [1024, 1024, 1024, 1024]
BATCH = 256
MICROBATCHES = 4
BUDGET = 40 << 20
"""Bytes of training state one worker may hold."""


def _run(fs: FeatureSet, strategy: str, epochs: int, storage: Path) -> float:
    cores = os.cpu_count() or 1
    # FSDP: batch per worker, so each step sees as many rows as a pipeline's (stages share one).
    batch = BATCH if strategy == "pipeline" else BATCH // 2
    train = TrainConfig(
        epochs=epochs,
        batch_size=batch,
        scaling={
            "workers": 2,
            "strategy": strategy,
            "cpus_per_worker": cores / 2,
            "pipeline": {"microbatches": MICROBATCHES, "schedule": "1f1b"},
        },
    )
    job = TrainJob.for_feature_set(TorchModelConfig(params={"hidden": HIDDEN}), train, fs)
    ends: list[float] = []
    train_distributed(
        job,
        fs,
        run_name=f"bench-{strategy}-{time.monotonic_ns()}",
        storage_path=storage,
        on_epoch=lambda metrics: ends.append(time.perf_counter()),
    )
    rows = fs.manifest.rows["train"]
    trained = rows - rows % BATCH if strategy == "pipeline" else (rows // 2) * 2
    return trained / statistics.median(b - a for a, b in itertools.pairwise(ends))


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows, epochs, repeats = (4_000, 3, 1) if args.quick else (12_000, 4, 2)
    with tempfile.TemporaryDirectory() as tmp:
        fs = synthetic_feature_set(rows, Path(tmp) / "features")
        model = build_model(TorchModelConfig(params={"hidden": HIDDEN}), 64, fs.num_outputs)
        parameters = sum(p.numel() for p in model.parameters())
        state = parameters * STATE_BYTES_PER_PARAMETER
        if not state > BUDGET >= state / 2:
            raise RuntimeError("the model must not fit the budget whole, and must fit it halved")
        runtime = start_ray(RuntimeSettings.build())
        measured: dict[str, list[float]] = {"pipeline": [], "fsdp": []}
        try:
            for strategy in ["pipeline", "fsdp"] * repeats:
                measured[strategy].append(_run(fs, strategy, epochs, Path(tmp) / "ray"))
        finally:
            stop_ray(runtime)
    pipeline, fsdp = statistics.median(measured["pipeline"]), statistics.median(measured["fsdp"])
    return {
        "rows_train": fs.manifest.rows["train"],
        "model": f"mlp {HIDDEN}, {parameters:,} parameters",
        "budget_mib_per_worker": BUDGET / (1 << 20),
        "training_state_mib_whole": round(state / (1 << 20), 1),
        "training_state_mib_per_worker": round(state / 2 / (1 << 20), 1),
        "batch_rows_per_step": BATCH,
        "microbatches": MICROBATCHES,
        "pipeline_samples_per_s": [round(r) for r in measured["pipeline"]],
        "fsdp_samples_per_s": [round(r) for r in measured["fsdp"]],
        "ratio": pipeline / fsdp,
    }
