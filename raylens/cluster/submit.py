"""Submitting a spec to a running Ray cluster through the Ray Jobs API, and following the job.

``raylens submit`` runs the same ``raylens run`` on the cluster: the spec's folder is uploaded as
the job's working directory, this raylens as a ``py_modules`` package (the cluster runs the
version that checked the spec), and the cluster's own Python and libraries do the rest (the
training image has them). What the job needs to outlive its head node is checked here, before
anything is uploaded: a run folder every node sees and a tracking server the cluster can reach.
The tracking URI travels as ``MLFLOW_TRACKING_URI`` in the job's environment, never in the spec,
its logged params or artifacts.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import raylens
from raylens.cluster.runtime import TRAIN_POLL_INTERVAL_S, JobsEndpoint
from raylens.errors import UserError
from raylens.storage import check_uri, is_uri

UPLOAD_EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "node_modules",
    "raylens-runs",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
)
"""Never part of a job's working directory: environments, caches, local run stores."""
DEFAULT_MAX_UPLOAD_MIB = 100
"""Ray's own ceiling is 512 MiB; a project folder far past 100 MiB usually holds data or a
virtual environment that the cluster should read from storage or its image instead."""
LOCAL_TRACKING = ("sqlite:", "file:", "default")


@dataclass(frozen=True)
class Submission:
    """What ``raylens submit`` sends: checked, nothing uploaded yet."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any] = field(repr=False)
    working_dir: Path
    upload_bytes: int
    tracking_uri: str = field(repr=False)


def plan_submission(
    spec: Path,
    *,
    spec_name: str,
    data_source: str | None = None,
    runs_dir: str | None,
    tracking_uri: str | None,
    overrides: Sequence[str] = (),
    python: str = "python",
    command: str = "run",
    max_upload_mib: float = DEFAULT_MAX_UPLOAD_MIB,
    now: datetime | None = None,
) -> Submission:
    """The job for ``spec``, or a ``UserError`` naming what would not work on a cluster."""
    if not runs_dir or not (runs_dir.startswith("/") or "://" in runs_dir):
        raise UserError(
            "--runs-dir: a submitted run writes its feature set, checkpoints and results where every "
            "node of the cluster can read them; give a folder they all mount (an absolute path such "
            "as /mnt/shared/raylens-runs), not a folder of this machine"
        )
    if is_uri(runs_dir):
        check_uri(runs_dir)  # the cluster reaches the storage, with its own credentials
    uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")).strip()
    if not uri or uri.startswith(LOCAL_TRACKING):
        raise UserError(
            "--tracking-uri: a submitted run records to an MLflow tracking server the cluster can "
            "reach (a SQLite file on the head node goes with it); start one "
            "(`mlflow server --host 0.0.0.0 --backend-store-uri postgresql://...`) and give its "
            "URL, e.g. --tracking-uri http://MLFLOW-HOST:5000 (or set MLFLOW_TRACKING_URI)"
        )
    working_dir = spec.resolve().parent
    if data_source is not None:
        _check_data_travels(data_source, working_dir)
    size, largest = upload_size(working_dir)
    if size > max_upload_mib * 2**20:
        biggest = ", ".join(f"{path} ({nbytes / 2**20:.0f} MiB)" for path, nbytes in largest)
        raise UserError(
            f"{working_dir} is {size / 2**20:.0f} MiB to upload, over --max-upload-mib "
            f"{max_upload_mib:g}; the largest: {biggest}. Keep data in shared storage and read it "
            "from there, add what the job does not need to a .rayignore, or raise --max-upload-mib"
        )
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    arguments = [
        python,
        "-m",
        "raylens.cluster.cli",
        command,
        spec.name,
        "--address",
        "auto",
        "--runs-dir",
        runs_dir,
        *[part for item in overrides for part in ("--set", item)],
    ]
    runtime_env = {
        "working_dir": str(working_dir),
        "py_modules": [str(Path(raylens.__file__).parent)],
        "excludes": list(UPLOAD_EXCLUDES),
        "env_vars": {
            "MLFLOW_TRACKING_URI": uri,
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_INTERVAL_S,
        },
    }
    return Submission(
        submission_id=f"raylens-{spec_name}-{stamp}",
        entrypoint=shlex.join(arguments),
        runtime_env=runtime_env,
        working_dir=working_dir,
        upload_bytes=size,
        tracking_uri=uri,
    )


def _check_data_travels(source: str, working_dir: Path) -> None:
    """A data file given relative to the spec must be inside the folder that is uploaded (an
    absolute path is read on the cluster: shared storage)."""
    if ":" in source.split("/")[0] or Path(source).is_absolute():  # sklearn:, synthetic:, s3://
        return
    if not (working_dir / source).resolve().is_relative_to(working_dir):
        raise UserError(
            f"data.source {source} lies outside {working_dir}, the folder uploaded with the job; "
            "move the data into it, or give an absolute path on storage every node mounts"
        )


def upload_size(folder: Path) -> tuple[int, list[tuple[str, int]]]:
    """Bytes of ``folder`` a job would upload (``UPLOAD_EXCLUDES`` left out), and its three
    largest top-level entries."""
    import fnmatch

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in UPLOAD_EXCLUDES)

    def size_of(path: Path) -> int:
        if path.is_symlink():
            return 0
        if path.is_file():
            return path.stat().st_size
        total = 0
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not excluded(d)]
            total += sum(
                (Path(root) / f).stat().st_size
                for f in files
                if not excluded(f) and not (Path(root) / f).is_symlink()
            )
        return total

    entries = [(p.name, size_of(p)) for p in folder.iterdir() if not excluded(p.name)]
    entries.sort(key=lambda e: e[1], reverse=True)
    return sum(n for _, n in entries), entries[:3]


class JobsClient:
    """The Ray Jobs API of one cluster, every call with the endpoint's token; Ray's own errors
    (a refused token, an unknown job) become ``UserError``s that say what to do."""

    def __init__(self, endpoint: JobsEndpoint) -> None:
        from ray.job_submission import JobSubmissionClient

        self.endpoint = endpoint
        with self._answers("connect"):
            self.client = JobSubmissionClient(endpoint.url, headers=endpoint.headers)

    @contextmanager
    def _answers(self, what: str) -> Iterator[None]:
        try:
            yield
        except UserError:
            raise
        except Exception as exc:
            text = str(exc)
            if "401" in text or "Unauthorized" in text or "403" in text or "Forbidden" in text:
                raise UserError(
                    f"{self.endpoint.url} refused the {'missing' if not self.endpoint.token else 'given'} "
                    "auth token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token "
                    "(`ray get-auth-token` on the head node prints it)"
                ) from None
            if "does not exist" in text or "404" in text:
                raise UserError(
                    f"no job '{what}' on {self.endpoint.url}; `raylens jobs list --address "
                    f"{self.endpoint.url}` shows its jobs"
                ) from None
            raise

    def submit(self, submission: Submission) -> str:
        with self._answers("submit"):
            return str(
                self.client.submit_job(
                    entrypoint=submission.entrypoint,
                    submission_id=submission.submission_id,
                    runtime_env=submission.runtime_env,
                    metadata={"raylens": raylens.__version__},
                )
            )

    def status(self, job_id: str) -> Any:
        with self._answers(job_id):
            return self.client.get_job_info(job_id)

    def jobs(self) -> list[Any]:
        with self._answers("list"):
            return list(self.client.list_jobs())

    def logs(self, job_id: str) -> str:
        with self._answers(job_id):
            return str(self.client.get_job_logs(job_id))

    def stop(self, job_id: str) -> bool:
        with self._answers(job_id):
            return bool(self.client.stop_job(job_id))

    def follow(self, job_id: str, write: Callable[[str], object] = sys.stdout.write) -> Any:
        """Stream the job's log until it ends; return its final info."""
        self.status(job_id)  # an unknown id is answered before streaming starts

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        with self._answers(job_id):
            asyncio.run(tail())
        return self.status(job_id)


def reattach_hint(job_id: str, address: str) -> str:
    return (
        f"follow it with: raylens jobs logs {job_id} --follow --address {address}; "
        f"stop it with: raylens jobs stop {job_id} --address {address}"
    )
