"""The tracker: the one writer of runs, metrics, plots and models to MLflow.

Only the driver (or a sweep's driver) holds a tracker; workers and trials report to Ray and the
driver writes. ``NullTracker`` has the same methods and writes nothing, so callers never ask
"is tracking on?".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from matplotlib.figure import Figure

MAX_PARAM_LENGTH = 6000


class Tracker(Protocol):
    def start_run(
        self, name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str: ...
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None: ...
    def log_dict(self, run_id: str, data: Any, path: str) -> None: ...
    def log_figure(self, run_id: str, figure: Figure, path: str) -> None: ...
    def end_run(self, run_id: str, status: str = "FINISHED") -> None: ...
    @contextmanager
    def active(self, run_id: str) -> Iterator[None]: ...


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"optimizer": {"lr": 1e-3}}}`` → ``{"train.optimizer.lr": 1e-3}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


class MlflowTracker:
    """Writes through ``MlflowClient`` with explicit run ids, so runs of a sweep can be open at once."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        # The fluent API (log_model, the registry) reads the global URI: set it once, here.
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = artifact_root.resolve().as_uri() if artifact_root is not None else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    def start_run(
        self, name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return str(run.info.run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_text(v)) for k, v in flatten(params).items()]
        for begin in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=items[begin : begin + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, run_id: str, data: Any, path: str) -> None:
        self.client.log_dict(run_id, data, path)

    def log_figure(self, run_id: str, figure: Figure, path: str) -> None:
        from matplotlib import pyplot as plt

        self.client.log_figure(run_id, figure, path)
        plt.close(figure)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def close_runs_tagged(self, key: str, value: str, status: str = "KILLED") -> int:
        """End the runs still RUNNING that carry tag ``key=value``, and their nested runs; return
        how many were ended."""
        closed = 0
        pending = [f"tags.`{key}` = '{value}'"]
        while pending:
            query = pending.pop()
            for run in self.client.search_runs(
                [self.experiment_id], filter_string=f"{query} and attributes.status = 'RUNNING'"
            ):
                self.client.set_terminated(run.info.run_id, status)
                pending.append(f"tags.mlflow.parentRunId = '{run.info.run_id}'")
                closed += 1
        return closed

    @contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        """Make ``run_id`` the fluent API's active run (``log_model`` takes no run id)."""
        import mlflow

        with mlflow.start_run(run_id=run_id):
            yield


class NullTracker:
    """A tracker that records nothing (benchmarks, dry runs)."""

    def start_run(
        self, name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        return "null"

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        pass

    def log_dict(self, run_id: str, data: Any, path: str) -> None:
        pass

    def log_figure(self, run_id: str, figure: Figure, path: str) -> None:
        from matplotlib import pyplot as plt

        plt.close(figure)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        pass

    @contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        yield


def git_commit(folder: Path) -> str | None:
    """The commit of the repository holding ``folder``, if it is in one (lineage tag)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=5,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_LENGTH]
