"""One dataset for concurrent trials: the memory 4 Ray actors on one node add to hold a feature
set's training split (300,000 rows x 64 float32, 73 MiB), taken as the sweep hands it to its
trials (the arrays put once in Ray's object store, each trial's ``ray.get`` a read-only view,
``Batches.from_numpy`` without a copy), beside each actor reading the split from the store itself
(``FeatureSet.read``: a private copy each). Memory is the sum of the PSS (proportional set size:
a shared page divided among the processes mapping it) of every process on the machine, after
all 4 touched every row, less the sum before the data was put or read; each trial process had
imported raylens and torch and run a first torch operation before (that is paid whatever a trial
trains on). Divided by one copy's size; the ratio printed last is the shared way's copies
(target ≤ 1.2).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from raylens.features import DataConfig, FeaturesConfig, build_feature_set

TRIALS = 4


def _machine_pss_mb() -> float:
    """The PSS of every process this user runs: their sum counts each resident page once, a
    shared one too (divided among all that map it, Ray's idle workers included)."""
    import psutil

    total = 0.0
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
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
                def __init__(self) -> None:
                    # A trial's process as it is before its data: raylens and torch imported,
                    # torch started (its thread pool, allocator), paid whatever it trains on.
                    import torch

                    from raylens.features.store import FeatureSet
                    from raylens.storage import Location
                    from raylens.trainer.loop import Batches

                    float(torch.ones(1024, 256).sum())
                    self.read = lambda path: FeatureSet(Location.of(path), fs.manifest).read("train")
                    self.wrap = Batches.from_numpy

                def hold(self, arrays: Any, path: str | None) -> None:
                    if path is not None:  # a copy of its own
                        own = self.read(path)
                        x, y = own.x, own.y
                    else:
                        x, y = arrays  # the object store's read-only views
                    self.batches = self.wrap(x, y)
                    float(self.batches.x.sum())  # every page touched

            def added(shared: bool) -> float:
                trials = [Trial.remote() for _ in range(TRIALS)]  # type: ignore[attr-defined]
                ray.get([t.__ray_ready__.remote() for t in trials])
                before = _machine_pss_mb()
                ref = ray.put((train.x, train.y)) if shared else None
                path = None if shared else fs.path.uri
                ray.get([t.hold.remote(ref, path) for t in trials])
                # Every process's share, taken once every trial holds the data: what the machine
                # spends on the 4 trials' data, whichever process a shared page is counted in.
                grown = _machine_pss_mb() - before
                for t in trials:
                    ray.kill(t)
                del ref
                return grown

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
