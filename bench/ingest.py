"""From a stored feature set to torch batches: rows/s of reading a version's training split with
``FeatureSet.read`` and cutting it into batches of 256 as the training loop does, beside a plain
pyarrow → NumPy → torch read of the same Parquet file cut the same way; and streamed through Ray
Data as ``train.data: ray_data`` reads it (``streamed_dataset``: features packed into one tensor
column, a one-worker run's shard read as its worker reads it, shuffled, an epoch a round;
``ray_data_ratio``, with the seconds to its first batch and its rows/s after it). 500,000 rows x
64 features; best of 5 rounds each, in turn. The ratio printed last is raylens (memory) ÷ plain.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from raylens.features import DataConfig, FeaturesConfig, build_feature_set
from raylens.features.store import TARGET
from raylens.trainer.loop import Batches

BATCH = 256


def _batches(x: torch.Tensor, y: torch.Tensor) -> int:
    rows = 0
    for start in range(0, len(x), BATCH):
        rows += len(x[start : start + BATCH]) + 0 * len(y[start : start + BATCH])
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows, features, rounds = (50_000, 16, 2) if args.quick else (500_000, 64, 5)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = f"synthetic:classification?rows={rows}&features={features}"
        fs = build_feature_set("ingest", DataConfig(source=source, target="target"), FeaturesConfig(), folder)
        file = fs.path.local_path / "train.parquet"
        columns = fs.feature_columns

        def raylens_read() -> int:
            train = fs.read("train")
            data = Batches(torch.from_numpy(train.x), torch.from_numpy(train.y))
            return _batches(data.x, data.y)

        def plain_read() -> int:
            table = pq.read_table(file)
            x = np.stack([table.column(c).to_numpy() for c in columns], axis=1).astype(np.float32)
            y = table.column(TARGET).to_numpy()
            return _batches(torch.from_numpy(x), torch.from_numpy(y))

        import ray

        from raylens.trainer.ray_train import RayDataBatches, streamed_dataset

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            # As Ray Train deals a streamed split to a run of one worker, read as the worker does.
            (shard,) = streamed_dataset(fs).streaming_split(1, equal=True)
            stream = RayDataBatches(shard, fs.manifest.rows["train"], torch.device("cpu"), 0, torch.int64)
            epochs = iter(range(rounds))
            steady: list[tuple[float, float]] = []  # (seconds to the first batch, rows/s after it)

            def ray_data_read() -> int:  # train.data: ray_data, one worker's stream
                rows, began, first = 0, time.perf_counter(), None
                for x, y in stream.epoch(next(epochs), BATCH):
                    if first is None:
                        first = time.perf_counter()
                    rows += len(x) + 0 * len(y)
                assert first is not None
                steady.append((first - began, (rows - BATCH) / (time.perf_counter() - first)))
                return rows

            best = {"raylens": float("inf"), "plain": float("inf"), "ray_data": float("inf")}
            for _ in range(rounds):
                for name, read in (
                    ("raylens", raylens_read),
                    ("plain", plain_read),
                    ("ray_data", ray_data_read),
                ):
                    began = time.perf_counter()
                    read()
                    best[name] = min(best[name], time.perf_counter() - began)
        finally:
            ray.shutdown()
        train_rows = fs.manifest.rows["train"]
    return {
        "rows": train_rows,
        "features": features,
        "raylens_rows_per_s": train_rows / best["raylens"],
        "plain_rows_per_s": train_rows / best["plain"],
        "ray_data_rows_per_s": train_rows / best["ray_data"],
        "ray_data_first_batch_s": min(first for first, _ in steady),
        "ray_data_steady_rows_per_s": max(rate for _, rate in steady),
        "ray_data_ratio": best["plain"] / best["ray_data"],
        "ratio": best["plain"] / best["raylens"],
    }
