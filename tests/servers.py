"""Real servers on 127.0.0.1 for tests and benchmarks: a Ray cluster as `ray start --head` makes
one, with token auth, and an `mlflow server`. Each runs in a session of its own and is stopped
with everything it started (`ray stop` would stop every Ray cluster on the machine)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environment() -> dict[str, str]:
    """A fresh user shell: no Ray address, Ray token or MLflow settings of the caller's."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_"))}


def wait_until_answered(
    request: urllib.request.Request | str, process: subprocess.Popen[bytes], seconds: float = 120
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited ({process.args})"
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    url = request if isinstance(request, str) else request.full_url
    raise AssertionError(f"{url} did not answer within {seconds:.0f} s")


def stop_session(process: subprocess.Popen[bytes], stop: signal.Signals = signal.SIGTERM) -> None:
    """Stop the process and every process it started (it leads a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, stop)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass(frozen=True)
class RayHead:
    dashboard: str
    """The Jobs API: http://127.0.0.1:PORT"""
    token: str


@contextlib.contextmanager
def ray_head(folder: Path, num_cpus: int = 4) -> Iterator[RayHead]:
    """`ray start --head --block` on loopback with RAY_AUTH_MODE=token and a new token."""
    token = secrets.token_hex(16)
    port, dashboard_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--include-dashboard=true",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
        ],
        env={**clean_environment(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        jobs = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        wait_until_answered(jobs, process)
        yield RayHead(url, token)
    finally:
        # `ray start --block` takes Ctrl-C as the word to stop its cluster (in seconds; a
        # SIGTERM leaves it waiting until it is killed).
        stop_session(process, signal.SIGINT)


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` on loopback, its store and artifacts in ``folder``; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
        ],
        cwd=folder,
        env=clean_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answered(f"{url}/health", process)
        yield url
    finally:
        stop_session(process)
