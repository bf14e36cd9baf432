"""Real servers on 127.0.0.1 for tests and benchmarks: a Ray cluster as `ray start --head` makes
one, with token auth, an `mlflow server`, and an S3 API (moto's server). Each runs in a session of
its own and is stopped with everything it started (`ray stop` would stop every Ray cluster on the
machine)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def run_as_script(module: str, folder: Path, timeout: float) -> dict[str, Any]:
    """``python -m module folder``: a test whose Ray cluster must live in a process of its own
    (the test session's cluster stays as it is); returns the JSON its last line prints."""
    script = subprocess.run(
        [sys.executable, "-m", module, str(folder)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[1],
    )
    assert script.returncode == 0, script.stderr[-3000:]
    return dict(json.loads(script.stdout.strip().splitlines()[-1]))


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


def _start_head(
    folder: Path, port: int, num_cpus: int, token: str, *options: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`ray start --head --block` on loopback, its GCS on ``port``, with RAY_AUTH_MODE=token."""
    return subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            # Not Ray's defaults (10001, 52365): heads and the in-process tests' cluster, running
            # side by side, each get their own (the Jobs API is served by the dashboard agent).
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            *options,
        ],
        env={**clean_environment(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **(env or {})},
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@contextlib.contextmanager
def ray_head(folder: Path, num_cpus: int = 4, env: dict[str, str] | None = None) -> Iterator[RayHead]:
    """`ray start --head` on loopback with RAY_AUTH_MODE=token, a new token and the dashboard;
    ``env``: more of its environment (a node's cloud credentials, say)."""
    token = secrets.token_hex(16)
    port, dashboard_port = free_port(), free_port()
    process = _start_head(
        folder,
        port,
        num_cpus,
        token,
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true",
        env=env,
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


def autoscaling_config(
    gcs_address: str, head_cpus: int, worker_cpus: int, max_workers: int
) -> dict[str, object]:
    """A cluster launcher config for Ray's fake multi-node provider: its "nodes" are raylets
    started on this machine by the head's autoscaler, which adds and removes them as a cloud
    provider would. (What ``ray.cluster_utils.AutoscalingCluster`` starts, without its
    ``ray stop --force``, which would stop every Ray cluster on the machine, and without the
    base file it reads, which the 2.60 wheel does not ship.)"""
    return {
        "cluster_name": "fake-autoscaling",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,
        "provider": {
            # `external` names the provider's class: the `fake_multinode` type would read the
            # missing base file for its defaults.
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": gcs_address,
            # The autoscaler knows a fake node's raylet by its node id, not by an address.
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {
                "resources": {"CPU": worker_cpus},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        **{key: {} for key in ("docker", "file_mounts", "auth")},
        **{
            key: []
            for key in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
            )
        },
        "file_mounts_sync_continuously": False,
    }


@contextlib.contextmanager
def autoscaling_ray_head(
    folder: Path, head_cpus: int, worker_cpus: int, max_workers: int, token: str
) -> Iterator[str]:
    """A head whose autoscaler adds nodes of ``worker_cpus`` CPUs (at most ``max_workers``) when
    work waits for resources and removes them once idle for 3 s; yields its GCS address."""
    port = free_port()
    config = folder / "autoscaling.json"
    config.write_text(
        json.dumps(autoscaling_config(f"127.0.0.1:{port}", head_cpus, worker_cpus, max_workers))
    )
    # A short folder of its own (socket paths must stay under 108 bytes): the fake nodes are
    # started by the autoscaler, outside the head's session, and found by it when stopping.
    temp = Path(tempfile.mkdtemp(prefix="rl-fake-"))
    process = _start_head(
        folder,
        port,
        head_cpus,
        token,
        f"--autoscaling-config={config}",
        "--include-dashboard=false",
        f"--temp-dir={temp}",
        env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_session(process, signal.SIGINT)
        _kill_processes_naming(str(temp))  # fake nodes the autoscaler had not removed yet
        shutil.rmtree(temp, ignore_errors=True)


def _kill_processes_naming(text: str) -> None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            if text in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)


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


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    """host:port of the S3 API"""
    env: dict[str, str]
    """What a process needs to reach it: test credentials, a region, no instance metadata lookups."""

    def uri(self, bucket: str, key: str = "") -> str:
        """``s3://bucket/key`` as raylens takes it, the endpoint in pyarrow's query options."""
        return f"s3://{bucket}/{key}?endpoint_override={self.endpoint}&scheme=http"


@contextlib.contextmanager
def s3_server(folder: Path, buckets: tuple[str, ...] = ("raylens",)) -> Iterator[S3Server]:
    """moto's S3 server on loopback with ``buckets`` made; stopped with everything it started."""
    port = free_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
    }
    process = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        cwd=folder,
        env={**clean_environment(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_answered(f"{url}/moto-api/", process)
        for bucket in buckets:
            made = urllib.request.Request(f"{url}/{bucket}", method="PUT")
            urllib.request.urlopen(made, timeout=10).close()
        yield S3Server(f"127.0.0.1:{port}", env)
    finally:
        stop_session(process)
