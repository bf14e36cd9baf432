"""Driving the real ``raylens`` CLI from tests: the reference project and spec, processes read
line by line so a test can act (send a signal) at a chosen point, and store snapshots.

The reference project trains iris from a CSV file with a model that sleeps in each training
step (``tests/faults/slow_models.py``), so every stage lasts long enough to be interrupted in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from sklearn.datasets import load_iris

from tests.servers import free_port

RAYLENS = str(Path(sys.executable).parent / "raylens")
SPEC = """
name: faults
data: {source: iris.csv, target: target, split: {valid: 0.2, test: 0.2, seed: 3}}
features: {transforms: [{standardize: "*"}]}
model: {name: "slow_models:build", params: {hidden: [16], dropout: 0.1, step_seconds: 0.1}}
train:
  epochs: 8
  batch_size: 8
  optimizer: {lr: 0.02}
  scaling: {workers: 2, strategy: ddp}
tune:
  trials: 4
  concurrency: 2
  scheduler: asha
  epochs: 3
  space: {train.optimizer.lr: "loguniform(1e-3, 5e-2)"}
tracking: {register_as: faults}
"""


def environment() -> dict[str, str]:
    # A fresh user shell: no Ray address and no MLflow settings left by other tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env["COLUMNS"] = "200"
    return env


def make_project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(SPEC)
    shutil.copy(Path(__file__).parent / "faults" / "slow_models.py", folder / "slow_models.py")
    load_iris(as_frame=True).frame.to_csv(folder / "iris.csv", index=False)
    return folder


class Invocation:
    """``raylens ARGS`` in ``folder``, read line by line so a test can act at a given point."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.folder = folder
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [RAYLENS, *args],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment(),
        )

    def wait_for_line(self, text: str, timeout: float = 300) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"never printed {text!r}:\n{self.output}")

    def wait_for(self, condition: object, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(condition) and condition():
                return
            time.sleep(0.1)
        raise AssertionError(f"condition not met in {timeout} s:\n{self.output}")

    def finish(self, timeout: float = 600) -> int:
        out, _ = self.process.communicate(timeout=timeout)
        self.lines.append(out)
        return self.process.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


def raylens(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RAYLENS, *args], cwd=folder, capture_output=True, text=True, env=environment(), timeout=900
    )


def client(folder: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder / 'raylens-runs' / 'mlflow.db'}")


def runs_of(folder: Path) -> list:  # type: ignore[type-arg]
    mlflow = client(folder)
    experiment = mlflow.get_experiment_by_name("faults")
    return list(mlflow.search_runs([experiment.experiment_id])) if experiment else []


def run_folder(folder: Path) -> Path:
    storage = folder / "raylens-runs" / "ray"
    return storage / (storage / "faults" / "LATEST").read_text().strip()


@dataclass(frozen=True)
class CliRun:
    folder: Path
    result: subprocess.CompletedProcess[str]


@contextmanager
def other_ray_cluster() -> Iterator[str]:
    """A Ray cluster started with `ray start --head`, as a user may have one on the machine; its
    address file is what made embedded mode fail before. Stopped through its own process only
    (`ray stop` would end every Ray process on the machine)."""
    address_file = Path("/tmp/ray/ray_current_cluster")
    existed = address_file.exists()
    port = free_port()
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--ray-client-server-port={free_port()}",  # not the defaults: other tests' heads run beside
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # up once its GCS answers (its address file may be stale)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        time.sleep(0.2)
    while not address_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        if not existed:  # the stopped cluster leaves its address file behind: tidy up after ourselves
            address_file.unlink(missing_ok=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a project's run folder (feature store, checkpoints, MLflow db) by content."""
    root = folder / "raylens-runs"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
