"""Answer to a spec mistake: seconds from launching `raylens validate` on a spec with a typo'd
key to its exit, beside the floor any Python CLI pays — a fresh interpreter that reads the YAML
file and validates it with a pydantic model, no raylens.

Each runs several times as a fresh process; the median is kept. The spec has two mistakes in
its keys and a third in its data path: raylens must name the key mistakes (all of them) before
anything heavy is imported; the data is not read while the spec itself is wrong.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SPEC = """
name: typo
data: {source: nowhere.csv, target: y}
train: {epoch: 3, optimizer: {lrr: 0.01}}
"""

FLOOR = """
import sys, yaml
from pydantic import BaseModel, ConfigDict
class Train(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = 1
raw = yaml.safe_load(open(sys.argv[1]))
try:
    Train.model_validate({"epochs": 1, **raw["train"]})
except Exception as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
"""


def _seconds(command: list[str], cwd: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - started)
        assert done.returncode == 2, done.stdout + done.stderr
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs = 3 if args.quick else 7
    raylens = str(Path(sys.executable).parent / "raylens")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "spec.yaml").write_text(SPEC)
        check = subprocess.run([raylens, "validate", "spec.yaml"], cwd=folder, capture_output=True, text=True)
        message = " ".join((check.stdout + check.stderr).split())
        assert "train.epoch: unknown key" in message and "train.optimizer.lrr" in message, message
        raylens_s = _seconds([raylens, "validate", "spec.yaml"], folder, runs)
        floor_s = _seconds([sys.executable, "-c", FLOOR, "spec.yaml"], folder, runs)
    return {"raylens_spec_error_s": raylens_s, "floor_s": floor_s, "ratio": raylens_s / floor_s}
