"""The online store's lookups: p50 and p99 of ``SqliteOnlineStore.get`` for 1 and for 100 entities,
beside the same queries through ``sqlite3`` alone (rows as tuples, no Arrow table), on a feature
set of 10,000 entities x 32 features materialized into a SQLite file. The ratio printed last is
raylens' p50 for 100 entities ÷ plain sqlite3's.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raylens.features import DataConfig, FeaturesConfig, build_feature_set
from raylens.features.online import SqliteOnlineStore, materialize

FEATURES = 32


def _percentiles(call: Callable[[], object], rounds: int) -> tuple[float, float]:
    took = []
    for _ in range(rounds):
        began = time.perf_counter()
        call()
        took.append(time.perf_counter() - began)
    took.sort()
    return 1000 * statistics.median(took), 1000 * took[int(0.99 * (len(took) - 1))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    entities, rounds = (1000, 200) if args.quick else (10_000, 2000)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        frame = pd.DataFrame(
            rng.normal(size=(entities, FEATURES)), columns=[f"f{i}" for i in range(FEATURES)]
        )
        frame["id"] = [f"e{i}" for i in range(entities)]
        frame["label"] = rng.integers(0, 2, entities)
        frame.to_parquet(folder / "rows.parquet")
        data = DataConfig(source="rows.parquet", target="label", entity="id")
        fs = build_feature_set("bench", data, FeaturesConfig(), folder / "store", folder)
        store = SqliteOnlineStore(folder / "online.db")
        materialize(fs, store)
        plain = sqlite3.connect(folder / "online.db")
        one, hundred = ["e17"], [f"e{i}" for i in rng.choice(entities, 100, replace=False)]

        def plain_get(ids: list[str]) -> list[tuple[Any, ...]]:
            marks = ", ".join("?" * len(ids))
            return plain.execute(f'SELECT * FROM features_bench WHERE "entity" IN ({marks})', ids).fetchall()

        figures = {
            "raylens_1": _percentiles(lambda: store.get("bench", one), rounds),
            "plain_1": _percentiles(lambda: plain_get(one), rounds),
            "raylens_100": _percentiles(lambda: store.get("bench", hundred), rounds),
            "plain_100": _percentiles(lambda: plain_get(hundred), rounds),
        }
        plain.close()
        store.close()
    result: dict[str, Any] = {"entities": entities, "features": FEATURES}
    for name, (p50, p99) in figures.items():
        result[f"{name}_p50_ms"], result[f"{name}_p99_ms"] = p50, p99
    result["ratio"] = figures["raylens_100"][0] / figures["plain_100"][0]
    return result
