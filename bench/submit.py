"""`raylens submit` of the demo spec to a Ray cluster on this machine (`ray start --head` on
127.0.0.1, token auth on, recording to an `mlflow server` on 127.0.0.1), beside `raylens run`
of the same spec embedded: seconds from the command's launch to the job's first log line and to
its end (``ratio``: submit ÷ run, both to the end; printed last).

What the submitted run pays on top: packaging and uploading the spec's folder and raylens,
the job's driver process on the cluster, and Ray Train workers (a cluster run never trains in
the driver). The cluster and the tracking server are started before the clock starts, as a
user's would be running already.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.servers import clean_environment, mlflow_server, ray_head

REPO = Path(__file__).resolve().parents[1]
RAYLENS = str(Path(sys.executable).parent / "raylens")


def _timed(command: list[str], env: dict[str, str], marker: str | None = None) -> tuple[float, float | None]:
    """Seconds to the end, and to the first output line after ``marker`` (the job's own log)."""
    started = time.monotonic()
    first: float | None = None
    seen_marker = marker is None
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if not seen_marker and marker is not None and marker in line:
                seen_marker = True
                continue
            if seen_marker and first is None and line.strip():
                first = time.monotonic() - started
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"{command[1]} exited with {code}")
    return time.monotonic() - started, first


def run(args: argparse.Namespace) -> dict[str, Any]:
    # --quick: `train` of 1 epoch (no sweep) instead of the whole `run`.
    command = "train" if args.quick else "run"
    overrides = ["--set", "train.epochs=1"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        project = root / "project"
        project.mkdir()
        shutil.copy(REPO / "examples" / "digits.yaml", project / "digits.yaml")
        (root / "head").mkdir()
        (root / "mlflow").mkdir()
        with ray_head(root / "head") as head, mlflow_server(root / "mlflow") as tracking:
            env = {**clean_environment(), "RAY_AUTH_TOKEN": head.token, "PYTHONPATH": str(REPO)}
            submit_s, first_line_s = _timed(
                [
                    RAYLENS,
                    "submit",
                    str(project / "digits.yaml"),
                    "--address",
                    head.dashboard,
                    "--runs-dir",
                    str(root / "shared-runs"),
                    "--tracking-uri",
                    tracking,
                    "--python",
                    sys.executable,
                    "--command",
                    command,
                    *overrides,
                ],
                env,
                marker="submitted job",
            )
        local = {**clean_environment(), "PYTHONPATH": str(REPO)}
        run_s, _ = _timed(
            [
                RAYLENS,
                "run",
                str(project / "digits.yaml"),
                "--runs-dir",
                str(root / "local-runs"),
                *overrides,
            ],
            local,
        )
    return {
        "submit_first_log_line_s": first_line_s,
        "submit_finished_s": submit_s,
        "run_finished_s": run_s,
        "ratio": submit_s / run_s,
    }
