"""One dataset for concurrent trials: the memory 4 Ray actors on one node add to hold a feature
set's training split (300,000 rows x 64 float32, 73 MiB), taken as the sweep hands it to its
trials (the arrays put once in Ray's object store, each trial's ``ray.get`` a read-only view,
``Batches.from_numpy`` without a copy), beside each actor reading the split from the store itself
(``FeatureSet.read``: a private copy each). Memory is each process's PSS (proportional set size:
shared pages divided among the processes mapping them) after it touched every row, less its PSS
before; summed over the 4 and the raylet (whose share of the object store's pages counts too) and
divided by one copy's size. The ratio printed last is the shared
way's copies (target ≤ 1.2).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from raylens.features import DataConfig, FeaturesConfig, build_feature_set

TRIALS = 4


def _pss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_full_info().pss) / 2**20


def _store_pss_mb() -> float:
    """The PSS of the raylet, which holds the object store's shared memory."""
    import psutil

    total = 0.0
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "raylet":
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += process.memory_full_info().pss / 2**20
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    rows = 30_000 if args.quick else 428_572  # 70 % train: 300,000 rows
    with tempfile.TemporaryDirectory() as tmp:
        source = f"synthetic:classification?rows={rows}&features=64"
        fs = build_feature_set(
            "share", DataConfig(source=source, target="target"), FeaturesConfig(), Path(tmp)
        )
        train = fs.read("train")
        copy_mb = (train.x.nbytes + train.y.nbytes) / 2**20
        ray.init(address="local", num_cpus=TRIALS + 2, include_dashboard=False, log_to_driver=False)
        try:

            @ray.remote(num_cpus=1)
            class Trial:
                def hold(self, arrays: Any, path: str | None) -> float:
                    from raylens.features.store import FeatureSet as Stored
                    from raylens.storage import Location
                    from raylens.trainer.loop import Batches

                    before = _pss_mb()
                    if path is not None:  # a copy of its own
                        own = Stored(Location.of(path), fs.manifest).read("train")
                        x, y = own.x, own.y
                    else:
                        x, y = arrays  # the object store's read-only views
                    self.batches = Batches.from_numpy(x, y)
                    float(self.batches.x.sum())  # every page touched
                    return _pss_mb() - before

            def added(shared: bool) -> float:
                trials = [Trial.remote() for _ in range(TRIALS)]  # type: ignore[attr-defined]
                ray.get([t.__ray_ready__.remote() for t in trials])
                store_before = _store_pss_mb()
                ref = ray.put((train.x, train.y)) if shared else None
                path = None if shared else fs.path.uri
                grown = ray.get([t.hold.remote(ref, path) for t in trials])
                # The object store's own share of the pages it maps with the trials.
                store_grown = _store_pss_mb() - store_before
                for t in trials:
                    ray.kill(t)
                return float(np.sum(grown)) + store_grown

            shared_mb, private_mb = added(shared=True), added(shared=False)
        finally:
            ray.shutdown()
    return {
        "trials": TRIALS,
        "copy_mb": copy_mb,
        "shared_added_mb": shared_mb,
        "private_added_mb": private_mb,
        "private_copies": private_mb / copy_mb,
        "ratio": shared_mb / copy_mb,
    }
