"""Where the trainer benchmark's gap comes from: the raylens loop on the calling thread vs on a
secondary thread (where Ray Train runs a worker's training function), with no Ray involved.

Both use the same intra-op thread count (all cores), model and data as ``bench trainer``; the
runs alternate, and the ratio (secondary thread ÷ main thread, median of the pairs) is printed
last. Set OMP_WAIT_POLICY in the environment to see its effect.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from bench.data import synthetic_feature_set
from bench.trainer import BATCH, HIDDEN, LR
from raylens.features import FeatureSet
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob, TrainState, run_worker


class _Rates:
    def __init__(self) -> None:
        self.rates: list[float] = []

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        self.rates.append(metrics["train_samples_per_s"])


def _loop(fs: FeatureSet, threads: int, epochs: int, on_secondary_thread: bool) -> float:
    rates = _Rates()

    def train() -> None:
        torch.set_num_threads(threads)
        train_config = TrainConfig(epochs=epochs, batch_size=BATCH, optimizer={"lr": LR})
        job = TrainJob.for_feature_set(TorchModelConfig(params={"hidden": HIDDEN}), train_config, fs)
        run_worker(job, fs.read("train"), fs.read("valid"), rates)

    if on_secondary_thread:
        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
    else:
        train()
    return statistics.median(rates.rates)


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = os.cpu_count() or 1
    rows, epochs, pairs = (20_000, 2, 1) if args.quick else (200_000, 3, 3)
    main: list[float] = []
    secondary: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        fs = synthetic_feature_set(rows, Path(tmp))
        for _ in range(pairs):
            main.append(_loop(fs, threads, epochs, on_secondary_thread=False))
            secondary.append(_loop(fs, threads, epochs, on_secondary_thread=True))
    return {
        "intra_op_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "main_thread_samples_per_s": [round(r) for r in main],
        "secondary_thread_samples_per_s": [round(r) for r in secondary],
        "ratio": statistics.median(s / m for s, m in zip(secondary, main, strict=True)),
    }
