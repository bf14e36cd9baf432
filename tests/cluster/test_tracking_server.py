"""The same run against a real `mlflow server` over HTTP, from the Python API (which must leave the
caller's process as it found it), and `raylens ui` serving the run store."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import mlflow
import pytest

from raylens.cluster.experiment import Experiment
from raylens.cluster.spec import parse_spec
from raylens.cluster.workspace import Workspace
from raylens.features.sources import load_source
from raylens.features.splits import split_rows
from tests.servers import free_port

BIN = Path(sys.executable).parent


def process_state() -> dict[str, object]:
    """What a library must not change in its caller's process. PyTorch's compiler stack sets a
    cache variable and warning filters of its own the first time it is imported (whoever imports
    it); it is imported first, so what is compared is what raylens itself does."""
    import torch._dynamo
    import torch.distributed.checkpoint.state_dict
    import torch.jit  # noqa: F401

    return {
        "environment": dict(os.environ),
        "warning filters": list(warnings.filters),
        "signal handlers": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)],
        "sys.path": list(sys.path),
        "MLflow tracking URI": mlflow.get_tracking_uri(),
        "MLflow registry URI": mlflow.get_registry_uri(),
        "log levels": {n: logging.getLogger(n).level for n in ("ray", "mlflow", "raylens", "py.warnings")},
    }


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


UI_PROCESSES: dict[str, subprocess.Popen[bytes]] = {}


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``raylens ui`` on a run store that already holds a run; it is also the tracking server the
    run below logs to over HTTP (an MLflow UI is a tracking server). The last test of this module
    stops it with SIGTERM, as a user or a scheduler would."""
    runs_dir = tmp_path_factory.mktemp("ui-runs")
    client = mlflow.MlflowClient(Workspace.at(runs_dir).default_tracking_uri)
    seeded = client.create_run(client.create_experiment("seeded", str(runs_dir / "artifacts")))
    client.log_metric(seeded.info.run_id, "valid_accuracy", 0.875, step=3)
    client.set_terminated(seeded.info.run_id)
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "raylens"), "ui", "--runs-dir", str(runs_dir), "--port", str(port)],
        cwd=runs_dir,  # where the server keeps artifacts logged to it over HTTP
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    UI_PROCESSES[url] = process
    try:
        wait_for_http(f"{url}/health", process)
        yield url
    finally:
        stop(process)  # a no-op once the last test has stopped it; kills what it left otherwise


def test_ui_serves_the_run_store_on_loopback_only(ui_server: str) -> None:
    with urllib.request.urlopen(f"{ui_server}/", timeout=10) as page:
        assert page.status == 200 and b"MLflow" in page.read()
    request = urllib.request.Request(
        f"{ui_server}/ajax-api/2.0/mlflow/experiments/search",
        json.dumps({"max_results": 100}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        experiments = {e["name"]: e["experiment_id"] for e in json.load(answer)["experiments"]}
    request = urllib.request.Request(
        f"{ui_server}/ajax-api/2.0/mlflow/runs/search",
        json.dumps({"experiment_ids": [experiments["seeded"]]}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        (run,) = json.load(answer)["runs"]
    assert run["data"]["metrics"] == [{"key": "valid_accuracy", "value": 0.875, "timestamp": ANY, "step": 3}]
    port = int(ui_server.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP port is listening on, from the kernel's socket table."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(
                        str(ipaddress.ip_address(bytes.fromhex(address)[::-1]))
                        if len(address) == 8
                        else address
                    )
    return found


@pytest.mark.usefixtures("ray_cluster")
def test_a_run_tracked_on_an_mlflow_server(
    ui_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracking_server = ui_server
    raw = {
        "name": "served",
        "data": {"source": "sklearn:iris", "target": "target"},
        "model": {"params": {"hidden": [8]}},
        "train": {"epochs": 2, "optimizer": {"lr": 0.05}},
        "tracking": {"uri": tracking_server, "register_as": "served-model"},
    }
    experiment = Experiment(parse_spec(raw), raw, tmp_path, Workspace.at(tmp_path / "runs"))
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
    # Every test row, as the user has it (raw columns): the served model scores what the run logged.
    frame = load_source("sklearn:iris").table.to_pandas()
    test_rows = split_rows(frame["target"].to_numpy(), experiment.spec.data.split, stratify=True).test
    predicted = model.predict(frame.iloc[test_rows].drop(columns=["target"]))
    assert len(predicted) == len(test_rows) and len(set(predicted)) > 1
    accuracy = float((predicted == frame["target"].to_numpy()[test_rows]).mean())
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"])


def test_ui_stopped_by_sigterm_leaves_nothing_running_or_listening(ui_server: str) -> None:
    """Runs last in this module: it stops the module's `raylens ui`."""
    process = UI_PROCESSES[ui_server]
    port = int(ui_server.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}
    # raylens, and the MLflow server it started (in a session of its own) with its workers.
    sessions = {os.getsid(process.pid)} | {os.getsid(child) for child in children(process.pid)}
    process.send_signal(signal.SIGTERM)  # to raylens alone, not to its group
    assert process.wait(timeout=60) == 0
    assert listening_addresses(port) == set()
    left = [pid for pid in all_pids() if session_of(pid) in sessions and not exited(pid)]
    assert left == [], f"still running after raylens ui stopped: {left}"


def exited(pid: int) -> bool:
    """A zombie: ended, waiting only for whoever adopted it to collect its exit status."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def children(pid: int) -> list[int]:
    found = []
    for child in all_pids():
        with contextlib.suppress(OSError, IndexError):
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
            if int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(child)
    return found
