"""Ctrl-C, SIGTERM and --resume of the real CLI, on embedded Ray and a real MLflow store.

One run of the spec is interrupted four times — SIGINT and SIGTERM during the sweep, SIGINT and
SIGTERM during the final training — and resumed after each. The resumed run must end exactly
where an uninterrupted run of the same spec ends (same best configuration, same test metrics),
in the same MLflow runs, with one value per epoch. Between the interruptions, resumes that must
be refused (edited spec, edited data, a second resume while one runs) exit 2 and write nothing.

The model sleeps in each training step (``slow_models``), so each stage lasts long enough to be
interrupted in; the uninterrupted baseline runs while another Ray cluster (`ray start --head`)
is up on the machine, which embedded mode must run beside.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from sklearn.datasets import load_iris

pytestmark = pytest.mark.e2e

RAYLENS = str(Path(sys.executable).parent / "raylens")
SPEC = """
name: faults
data: {source: iris.csv, target: target, split: {valid: 0.2, test: 0.2, seed: 3}}
features: {transforms: [{standardize: "*"}]}
model: {name: "slow_models:build", params: {hidden: [16], dropout: 0.1, step_seconds: 0.1}}
train:
  epochs: 10
  batch_size: 8
  optimizer: {lr: 0.02}
  scaling: {workers: 2, strategy: ddp}
tune:
  trials: 4
  concurrency: 2
  scheduler: fifo
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
    shutil.copy(Path(__file__).parent / "slow_models.py", folder / "slow_models.py")
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


def final_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in (run_folder(folder) / "final").glob("checkpoint_*") if p.is_dir())


def snapshot(folder: Path) -> dict[str, bytes]:
    root = folder / "raylens-runs"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_stopped_cleanly(folder: Path, invocation: Invocation, code: int) -> None:
    """Exit 128 + signal, a message saying how to resume, no run left RUNNING, nothing registered."""
    assert invocation.finish() == code, invocation.output
    assert "--resume" in invocation.output and "Traceback" not in invocation.output, invocation.output
    assert {run.info.status for run in runs_of(folder)} <= {"KILLED", "FINISHED"}
    assert not client(folder).search_model_versions("name='faults'")


@pytest.fixture(scope="module")
def other_ray_cluster() -> Iterator[None]:
    """A Ray cluster started with `ray start --head`, as a user may have one on the machine; its
    address file is what made embedded mode fail before. Stopped by its own process only."""
    address_file = Path("/tmp/ray/ray_current_cluster")
    existed = address_file.exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
    )
    deadline = time.monotonic() + 60
    while not address_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        yield
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        if not existed:  # the stopped cluster leaves its address file behind: tidy up after ourselves
            address_file.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, other_ray_cluster: None) -> Path:
    folder = make_project(tmp_path_factory.mktemp("uninterrupted"))
    done = raylens(folder, "run", "spec.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


def outcome(folder: Path) -> tuple[dict[str, str], dict[str, float]]:
    """The best configuration (root run) and the test metrics (final run) a run ended with."""
    runs = runs_of(folder)
    (root,) = [r for r in runs if r.data.tags.get("raylens.role") == "experiment"]
    (final,) = [r for r in runs if r.data.tags.get("raylens.role") == "final"]
    best = {k: v for k, v in root.data.params.items() if k.startswith("best.")}
    return best, {k: v for k, v in final.data.metrics.items() if k.startswith("test_")}


def test_interrupted_four_times_and_resumed_ends_like_the_uninterrupted_run(
    tmp_path: Path, uninterrupted: Path
) -> None:
    folder = make_project(tmp_path / "project")

    # 1. SIGINT during the sweep, once a trial has finished.
    first = Invocation(folder, "run", "spec.yaml")
    first.wait_for_line("trial ")
    first.process.send_signal(signal.SIGINT)
    assert_stopped_cleanly(folder, first, 130)
    root_ids = {r.info.run_id for r in runs_of(folder) if r.data.tags.get("raylens.role") == "experiment"}
    assert len(root_ids) == 1

    # Resumes that must be refused write nothing.
    before = snapshot(folder)
    spec = (folder / "spec.yaml").read_text()
    (folder / "spec.yaml").write_text(spec.replace("epochs: 10", "epochs: 11"))
    refused = raylens(folder, "run", "spec.yaml", "--resume")
    assert refused.returncode == 2 and "train.epochs: 10 → 11" in refused.stderr, refused.stderr
    (folder / "spec.yaml").write_text(spec)
    data = (folder / "iris.csv").read_text()
    (folder / "iris.csv").write_text(data + "5.0,3.0,1.5,0.2,0\n")
    refused = raylens(folder, "run", "spec.yaml", "--resume")
    assert refused.returncode == 2 and "the data of 'iris.csv' changed" in refused.stderr, refused.stderr
    (folder / "iris.csv").write_text(data)
    refused = raylens(folder, "train", "spec.yaml", "--resume")
    assert refused.returncode == 2 and "resume it with `raylens run SPEC --resume`" in refused.stderr
    assert snapshot(folder) == before

    # 2. SIGTERM during the resumed sweep.
    second = Invocation(folder, "run", "spec.yaml", "--resume")
    second.wait_for_line("trial ")
    second.process.send_signal(signal.SIGTERM)
    assert_stopped_cleanly(folder, second, 143)

    # 3. SIGINT during the final training, after its first checkpoint.
    third = Invocation(folder, "run", "spec.yaml", "--resume")
    third.wait_for_line("Training")
    third.wait_for(lambda: len(final_checkpoints(folder)) >= 1)
    third.process.send_signal(signal.SIGINT)
    assert_stopped_cleanly(folder, third, 130)

    # 4. SIGTERM during the resumed training, after it wrote a checkpoint of its own.
    seen = set(final_checkpoints(folder))
    fourth = Invocation(folder, "run", "spec.yaml", "--resume")
    fourth.wait_for_line("Training")
    fourth.wait_for(lambda: bool(set(final_checkpoints(folder)) - seen))
    fourth.process.send_signal(signal.SIGTERM)
    assert_stopped_cleanly(folder, fourth, 143)

    # 5. The last resume finishes; a second resume of the same run meanwhile is refused.
    last = Invocation(folder, "run", "spec.yaml", "--resume")
    last.wait_for_line("Starting Ray")
    concurrent = raylens(folder, "run", "spec.yaml", "--resume")
    assert concurrent.returncode == 2 and "is in use by another raylens process" in concurrent.stderr
    assert last.finish() == 0, last.output

    assert outcome(folder) == outcome(uninterrupted)
    runs = runs_of(folder)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_id for r in runs if r.data.tags.get("raylens.role") == "experiment"} == root_ids
    roles = sorted(r.data.tags.get("raylens.role") for r in runs)
    assert roles == ["experiment", "final"] + ["trial"] * 4  # no duplicate run for a resumed trial or run
    mlflow = client(folder)
    for run in runs:
        if run.data.tags["raylens.role"] != "experiment":
            steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "valid_loss")]
            expected = 10 if run.data.tags["raylens.role"] == "final" else 3
            assert steps == list(range(1, expected + 1)), (run.info.run_name, steps)
    (version,) = mlflow.search_model_versions("name='faults'")
    assert version.run_id == next(r.info.run_id for r in runs if r.data.tags["raylens.role"] == "final")
