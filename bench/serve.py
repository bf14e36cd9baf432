"""Serving one registered model: ``raylens serve`` (Ray Serve, one replica, batching) beside
``mlflow models serve --env-manager local`` (one uvicorn worker) of the same version, on this
machine, one after the other.

The model: a torch MLP on scikit-learn's digits (64 features, 10 classes), registered in a
temporary SQLite store. Requests hold one row (`dataframe_records`), sent over loopback by
aiohttp from this process:

- open loop at fixed rates (requests started on a clock, whatever the answers): the throughput
  achieved, p50 and p99 latency, errors;
- closed loop with 16 concurrent clients: the most requests per second each server answers.

The ratio printed last is raylens' closed-loop requests/s ÷ MLflow's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CLIENTS = 16


def _register(folder: Path) -> tuple[str, list[dict[str, Any]]]:
    """Train and register the digits model; the tracking URI and test rows as JSON records."""
    from raylens.cluster.experiment import Experiment
    from raylens.cluster.pipeline import records_of
    from raylens.features.drift import raw_rows

    spec = {
        "name": "digits",
        "data": {"source": "sklearn:digits", "target": "target", "split": {"valid": 0.15, "test": 0.15}},
        "features": {"transforms": [{"standardize": "*"}]},
        "model": {"family": "torch", "name": "mlp", "params": {"hidden": [128, 64]}},
        "train": {"epochs": 3, "batch_size": 64},
        "tracking": {"register_as": "digits-bench"},
    }
    experiment = Experiment.from_dict(spec, runs_dir=folder / "runs")
    summary = experiment.run(tune=False)
    rows, _ = raw_rows(summary.feature_set, "test")
    return experiment.tracking_uri, records_of(rows)


async def _send(session: Any, url: str, body: bytes) -> tuple[float, bool]:
    began = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            await response.read()
            ok = response.status == 200
    except Exception:  # a dropped connection is an error of the server under load
        ok = False
    return time.perf_counter() - began, ok


def _summary(latencies: list[float], errors: int, seconds: float) -> dict[str, float]:
    latencies = sorted(latencies) or [float("nan")]
    return {
        "rps": (len(latencies) - errors) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "errors": errors,
    }


async def _open_loop(url: str, bodies: list[bytes], rate: float, seconds: float) -> dict[str, float]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        began = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(session, url, bodies[i % len(bodies)])))
        results = await asyncio.gather(*tasks)
        took = time.perf_counter() - began
    return _summary([r[0] for r in results], sum(not r[1] for r in results), took)


async def _closed_loop(url: str, bodies: list[bytes], seconds: float) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(start: int) -> None:
        nonlocal errors
        i = start
        while time.perf_counter() < deadline:
            took, ok = await _send(session, url, bodies[i % len(bodies)])
            latencies.append(took)
            errors += not ok
            i += CLIENTS

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        began = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        took = time.perf_counter() - began
    return _summary(latencies, errors, took)


def _measure(url: str, bodies: list[bytes], rates: list[float], seconds: float) -> dict[str, Any]:
    asyncio.run(_closed_loop(url, bodies, 2.0))  # warm-up: connections, caches, first batches
    figures: dict[str, Any] = {"closed": asyncio.run(_closed_loop(url, bodies, seconds))}
    for rate in rates:
        figures[f"open_{rate:g}"] = asyncio.run(_open_loop(url, bodies, rate, seconds))
    return figures


def _wait_for(url: str, server: subprocess.Popen[bytes] | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before {url} answered")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} never answered")


def _mlflow(tracking_uri: str, bodies: list[bytes], rates: list[float], seconds: float) -> dict[str, Any]:
    from raylens.cluster.serving import free_port

    port = free_port("127.0.0.1")
    bin_dir = Path(sys.executable).parent  # MLflow starts `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_REGISTRY_URI": tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    mlflow_cli = str(bin_dir / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", "models:/digits-bench/1", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", server)
        return _measure(f"http://127.0.0.1:{port}/invocations", bodies, rates, seconds)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _raylens(tracking_uri: str, bodies: list[bytes], rates: list[float], seconds: float) -> dict[str, Any]:
    import ray

    from raylens.cluster.release_config import ServeConfig
    from raylens.cluster.serving import ModelTarget, start_endpoint

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        endpoint = start_endpoint(ModelTarget("digits-bench", version="1"), tracking_uri, ServeConfig(port=0))
        _wait_for(f"{endpoint.url}/health")
        return _measure(f"{endpoint.url}/predict", bodies, rates, seconds)
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds, rates = (3.0, [20.0]) if args.quick else (10.0, [25.0, 50.0, 100.0])
    with tempfile.TemporaryDirectory() as tmp:
        tracking_uri, rows = _register(Path(tmp))
        bodies = [json.dumps({"dataframe_records": [row]}).encode() for row in rows]
        mlflow_figures = _mlflow(tracking_uri, bodies, rates, seconds)
        raylens_figures = _raylens(tracking_uri, bodies, rates, seconds)
    result: dict[str, Any] = {"rows_per_request": 1, "clients": CLIENTS, "seconds": seconds}
    for name, figures in (("mlflow", mlflow_figures), ("raylens", raylens_figures)):
        for load, values in figures.items():
            for key, value in values.items():
                result[f"{name}_{load}_{key}"] = value
    result["ratio"] = raylens_figures["closed"]["rps"] / mlflow_figures["closed"]["rps"]
    return result
