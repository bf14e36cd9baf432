"""Cold start: seconds from launching `raylens train` to its first optimizer step, beside a bare
PyTorch script that imports torch, loads the same data and takes one step.

`raylens train` runs twice: with 2 DDP workers (a Ray Train worker group; ``ratio``, printed
last) and with 1 worker (``ratio_1_worker``), the default, which on embedded Ray trains in the
driver's process. Beside the 2 workers, the same step written by hand with Ray Train (a script
that starts Ray and runs a ``TorchTrainer`` of 2 workers: ``ratio_to_ray_train``) shows what of
the time is Ray Train's own.

The first step is observed through a user model (``bench.startup_model:build``) whose first
forward writes a timestamp: no hook in raylens itself. Both run as fresh processes with no Ray
running; raylens also creates its MLflow store and feature set from scratch, as on first use.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raylens.cluster.runtime import embedded_cpus

SPEC = """
name: startup
data: {source: "sklearn:digits", target: target}
model: {name: "bench.startup_model:build"}
train: {epochs: 1, batch_size: 64, scaling: {workers: 2, strategy: ddp}}
"""

BARE = """
import time, torch
from sklearn.datasets import load_digits
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                            torch.nn.ReLU(), torch.nn.Linear(64, 10))
optimizer = torch.optim.AdamW(model.parameters())
torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
optimizer.step()
open({path!r}, "w").write(str(time.time()))
"""

RAY_TRAIN_BY_HAND = """
import time, ray, ray.train, ray.train.torch, torch

def loop():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    model = ray.train.torch.prepare_model(torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10)))
    optimizer = torch.optim.AdamW(model.parameters())
    torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    optimizer.step()
    if ray.train.get_context().get_world_rank() == 0:
        open({path!r}, "w").write(str(time.time()))

ray.init(address="local", num_cpus={cpus}, include_dashboard=False)
ray.train.torch.TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=2)).fit()
"""


def _first_step_seconds(command: list[str], marker: Path, cwd: Path, env: dict[str, str]) -> float:
    started = time.time()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, timeout=600)
    return float(marker.read_text()) - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(repo)}
        env.pop("RAY_ADDRESS", None)

        def first_step(name: str, command: list[str]) -> float:
            """In a folder of its own: each raylens run creates its MLflow store and feature set."""
            folder = Path(tmp) / name
            folder.mkdir()
            (folder / "startup.yaml").write_text(SPEC)
            marker = folder / "first_step"
            return _first_step_seconds(
                command, marker, folder, {**env, "RAYLENS_BENCH_FIRST_STEP": str(marker)}
            )

        raylens = [str(bin_dir / "raylens"), "train", "startup.yaml"]
        raylens_s = first_step("two-workers", raylens)
        one_worker = ["--set", "train.scaling.workers=1", "--set", "train.scaling.strategy=auto"]
        raylens_1_s = first_step("one-worker", [*raylens, *one_worker])
        by_hand_marker = Path(tmp) / "ray-train" / "first_step"
        by_hand = RAY_TRAIN_BY_HAND.format(path=str(by_hand_marker), cpus=embedded_cpus())
        ray_train_s = first_step("ray-train", [sys.executable, "-c", by_hand])
        bare_s = first_step(
            "bare", [sys.executable, "-c", BARE.format(path=str(Path(tmp) / "bare" / "first_step"))]
        )
    return {
        "raylens_first_step_s": raylens_s,
        "raylens_1_worker_first_step_s": raylens_1_s,
        "ray_train_by_hand_first_step_s": ray_train_s,
        "bare_first_step_s": bare_s,
        "ratio_1_worker": raylens_1_s / bare_s,
        "ratio_to_ray_train": raylens_s / ray_train_s,
        "ratio": raylens_s / bare_s,
    }
