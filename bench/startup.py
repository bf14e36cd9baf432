"""Cold start: seconds from launching `raylens train` to its first optimizer step, beside a bare
PyTorch script that imports torch, loads the same data and takes one step.

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


def _first_step_seconds(command: list[str], marker: Path, cwd: Path, env: dict[str, str]) -> float:
    started = time.time()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, timeout=600)
    return float(marker.read_text()) - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "startup.yaml").write_text(SPEC)
        marker = folder / "first_step"
        env = {**os.environ, "PYTHONPATH": str(repo), "RAYLENS_BENCH_FIRST_STEP": str(marker)}
        env.pop("RAY_ADDRESS", None)
        raylens_s = _first_step_seconds(
            [str(bin_dir / "raylens"), "train", "startup.yaml"], marker, folder, env
        )
        marker.unlink()
        bare_s = _first_step_seconds(
            [sys.executable, "-c", BARE.format(path=str(marker))], marker, folder, env
        )
    return {"raylens_first_step_s": raylens_s, "bare_first_step_s": bare_s, "ratio": raylens_s / bare_s}
