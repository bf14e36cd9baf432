"""The same run against a real `mlflow server` over HTTP, from the Python API (which must leave the
caller's process as it found it), and `raylens ui` serving the run store."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from sklearn.datasets import load_iris

from raylens.cluster.experiment import Experiment
from raylens.cluster.spec import parse_spec
from raylens.cluster.workspace import Workspace

BIN = Path(sys.executable).parent


def process_state() -> dict[str, object]:
    """What a library must not change in its caller's process."""
    return {
        "environment": dict(os.environ),
        "warning filters": list(warnings.filters),
        "signal handlers": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)],
        "sys.path": list(sys.path),
        "MLflow tracking URI": mlflow.get_tracking_uri(),
        "MLflow registry URI": mlflow.get_registry_uri(),
        "log levels": {n: logging.getLogger(n).level for n in ("ray", "mlflow", "raylens", "py.warnings")},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, process: subprocess.Popen[bytes], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process it started (it runs in its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process)
        yield url
    finally:
        stop(process)


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_tracked_on_an_mlflow_server(
    tracking_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = parse_spec(
        {
            "name": "served",
            "data": {"source": "sklearn:iris", "target": "target"},
            "model": {"params": {"hidden": [8]}},
            "train": {"epochs": 2, "optimizer": {"lr": 0.05}},
            "tracking": {"uri": tracking_server, "register_as": "served-model"},
        }
    )
    experiment = Experiment(spec, "name: served\n", tmp_path, Workspace.at(tmp_path / "runs"))
    before = process_state()
    summary = experiment.run(tune=False)
    assert process_state() == before  # used as a library, raylens leaves the process as it found it

    assert summary.final is not None and summary.final.registered_version == "1"
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # everything went to the server
    client = mlflow.MlflowClient(tracking_server)
    run = client.get_run(summary.final.run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert "plots/test_confusion_matrix.png" in [
        a.path for a in client.list_artifacts(run.info.run_id, "plots")
    ]
    # Through the environment, as a user's shell would: setting MLflow's global URI here would
    # leak into every later test of this process.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    model = mlflow.pyfunc.load_model("models:/served-model/1")
    raw = load_iris(as_frame=True).frame
    assert list(model.predict(raw.drop(columns=["target"]).head(3))) == list(raw["target"].head(3))


def test_ui_serves_the_run_store_on_loopback(tmp_path: Path) -> None:
    Workspace.at(tmp_path).ensure()
    mlflow.MlflowClient(Workspace.at(tmp_path).default_tracking_uri).search_experiments()  # creates the db
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "raylens"), "ui", "--runs-dir", str(tmp_path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", process)
    finally:
        stop(process)
