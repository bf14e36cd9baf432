"""The tracker: the one writer of runs, metrics, plots and models to MLflow.

Only the driver (or a sweep's driver) holds a tracker; workers and trials report to Ray and the
driver writes. ``NullTracker`` has the same methods and writes nothing, so callers never ask
"is tracking on?".
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from matplotlib.figure import Figure

from raylens.errors import UserError
from raylens.interrupts import deferred_interrupts
from raylens.interrupts import pending as interrupt_pending

if TYPE_CHECKING:
    from raylens.features import FeatureSet
    from raylens.trainer.family import Trained, TrainJob
    from raylens.trainer.registry import LoggedModel

MAX_PARAM_LENGTH = 6000
_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


class Tracker(Protocol):
    def start_run(
        self, name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str: ...
    def reopen_run(self, run_id: str) -> None: ...
    def metric_history(self, run_id: str) -> list[dict[str, float]]: ...
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None: ...
    def log_dict(self, run_id: str, data: Any, path: str) -> None: ...
    def log_text(self, run_id: str, text: str, path: str) -> None: ...
    def log_bytes(self, run_id: str, content: bytes, path: str) -> None: ...
    def log_figure(self, run_id: str, figure: Figure, path: str) -> None: ...
    def end_run(self, run_id: str, status: str = "FINISHED") -> None: ...
    @contextmanager
    def active(self, run_id: str) -> Iterator[None]: ...
    def log_model(
        self,
        run_id: str,
        trained: Trained,
        job: TrainJob,
        feature_set: FeatureSet,
        *,
        x_sample: Any,
        register_as: str | None = None,
        lineage: Mapping[str, str] | None = None,
        headline: Mapping[str, float] | None = None,
    ) -> LoggedModel | None:
        """Log the run's model and register it as ``register_as`` (``raylens.trainer.registry``);
        ``None`` when this tracker records no models."""
        ...


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


F = TypeVar("F", bound=Callable[..., Any])


def _uninterrupted(write: F) -> F:
    """A write to the tracking store finishes before a stop signal is raised (see
    ``raylens.interrupts``): an interrupted SQLite transaction would leave the store locked."""

    @functools.wraps(write)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deferred_interrupts():
            return write(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class MlflowTracker:
    """Writes through ``MlflowClient`` with explicit run ids, so runs of a sweep can be open at once.

    It never sets MLflow's process-wide tracking URI: the one call that needs the fluent API
    (``log_model``) runs inside ``active``, which sets the URI and puts the old one back.
    """

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        shown = redact(tracking_uri)
        check_tracking_uri(tracking_uri)
        try:
            self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
        except Exception as exc:  # each store backend fails its own way: name the URI and the cause
            raise UserError(
                f"tracking.uri: cannot open the MLflow tracking store at '{shown}': "
                f"{redact(_first_line(exc))}; check the URI (sqlite:///absolute/path.db, "
                "http://host:port, ...) or leave tracking.uri unset for the run folder's SQLite store"
            ) from None
        if found is not None and found.lifecycle_stage == "deleted":
            raise UserError(
                f"tracking: the MLflow experiment '{experiment}' was deleted (id {found.experiment_id}); "
                f"restore it with `mlflow experiments restore --experiment-id {found.experiment_id}` "
                f"(MLFLOW_TRACKING_URI={shown}), or set tracking.experiment to a new name"
            )
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = artifact_root.resolve().as_uri() if artifact_root is not None else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)

    @_uninterrupted
    def start_run(
        self, name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> str:
        all_tags = {k: redact(str(v)) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return str(run.info.run_id)

    @_uninterrupted
    def reopen_run(self, run_id: str) -> None:
        """Continue a run an interrupted invocation left (KILLED or RUNNING) instead of starting
        a second one: the resumed run keeps its id, params and earlier epochs."""
        self.client.update_run(run_id, status="RUNNING")

    def metric_history(self, run_id: str) -> list[dict[str, float]]:
        """Every logged step of the run as one dict per step, in step order."""
        steps: dict[int, dict[str, float]] = {}
        for key in self.client.get_run(run_id).data.metrics:
            for metric in self.client.get_metric_history(run_id, key):
                steps.setdefault(metric.step, {})[key] = metric.value
        return [steps[step] for step in sorted(steps)]

    @_uninterrupted
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_text(v)) for k, v in flatten(params).items()]
        for begin in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=items[begin : begin + 100])

    @_uninterrupted
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

    @_uninterrupted
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    @_uninterrupted
    def log_dict(self, run_id: str, data: Any, path: str) -> None:
        self.client.log_dict(run_id, redact_values(data), path)

    @_uninterrupted
    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, redact(text), path)

    @_uninterrupted
    def log_bytes(self, run_id: str, content: bytes, path: str) -> None:
        """A binary file (Parquet) as the artifact ``path``; not redacted (no text in it)."""
        import posixpath
        import tempfile

        folder, name = posixpath.split(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            local.write_bytes(content)
            self.client.log_artifact(run_id, str(local), folder or None)

    @_uninterrupted
    def log_figure(self, run_id: str, figure: Figure, path: str) -> None:
        from matplotlib import pyplot as plt

        self.client.log_figure(run_id, figure, path)
        plt.close(figure)

    @_uninterrupted
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    @_uninterrupted
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

    def log_model(
        self,
        run_id: str,
        trained: Trained,
        job: TrainJob,
        feature_set: FeatureSet,
        *,
        x_sample: Any,
        register_as: str | None = None,
        lineage: Mapping[str, str] | None = None,
        headline: Mapping[str, float] | None = None,
    ) -> LoggedModel:
        """Log and register (``raylens.trainer.registry``). Logging and registering is many
        writes: a stop signal waits for them, and then a version registered now is taken back, so
        an interrupted run never leaves a registered model."""
        from dataclasses import replace

        from raylens.trainer.registry import log_model

        with deferred_interrupts():
            logged = log_model(
                self, run_id, trained, job, feature_set, x_sample, register_as, lineage or {}, headline
            )
            if register_as and logged.version and logged.registered_now and interrupt_pending():
                self.client.delete_model_version(register_as, logged.version)
                logged = replace(logged, version=None, registered_now=False)
        return logged

    @contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        """Make ``run_id`` the fluent API's active run (``log_model`` takes no run id), on this
        tracker's store; MLflow's global URIs and their environment variables are put back after."""
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        saved_env = {key: os.environ.get(key) for key in _URI_VARIABLES}
        saved_tracking, saved_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        try:
            with mlflow.start_run(run_id=run_id):
                yield
        finally:
            mlflow.set_tracking_uri(saved_tracking)  # type: ignore[arg-type]  # None: back to unset
            registry_utils._registry_uri = saved_registry
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class NullTracker:
    """A tracker that records nothing (benchmarks, dry runs)."""

    def reopen_run(self, run_id: str) -> None:
        pass

    def metric_history(self, run_id: str) -> list[dict[str, float]]:
        return []

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

    def log_text(self, run_id: str, text: str, path: str) -> None:
        pass

    def log_bytes(self, run_id: str, content: bytes, path: str) -> None:
        pass

    def log_figure(self, run_id: str, figure: Figure, path: str) -> None:
        from matplotlib import pyplot as plt

        plt.close(figure)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        pass

    @contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        yield

    def log_model(
        self,
        run_id: str,
        trained: Trained,
        job: TrainJob,
        feature_set: FeatureSet,
        *,
        x_sample: Any,
        register_as: str | None = None,
        lineage: Mapping[str, str] | None = None,
        headline: Mapping[str, float] | None = None,
    ) -> LoggedModel | None:
        return None


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
    return redact(text)[:MAX_PARAM_LENGTH]


def ended_status(exc: BaseException) -> str:
    """The MLflow status of a run that ``exc`` ended: KILLED when the user stopped it (Ctrl-C,
    SIGTERM), FAILED otherwise."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<secret>[^/@\s]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|token|access_token|secret|key|api_key|sig|signature)=)[^&\s]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``postgresql://me:hunter2@db/x?token=abc`` → ``postgresql://me:***@db/x?token=***``.

    Applied to everything the tracker records, so a credential in a URI of the spec never
    reaches a param, a tag or a logged file."""
    text = _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)
    return _SECRET_QUERY.sub(r"\g<key>***", text)


def redact_values(data: Any) -> Any:
    """``redact`` applied to every string inside a JSON-like value."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, Mapping):
        return {key: redact_values(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [redact_values(value) for value in data]
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def check_tracking_uri(tracking_uri: str, timeout_s: float = 3.0) -> None:
    """The checks of a tracking URI that take a moment, not MLflow's minutes of HTTP retries:
    a tracking server must be listening, a SQLite database's folder must exist."""
    import socket
    from urllib.parse import urlsplit

    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise UserError(
                f"tracking.uri: the folder of the SQLite database '{redact(tracking_uri)}' does not exist "
                f"({folder}); create it, or leave tracking.uri unset for the run folder's store"
            )
        return
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"tracking.uri: no MLflow tracking server answers at '{redact(tracking_uri)}' ({exc}); "
            "start it (`mlflow server --host 127.0.0.1 --port PORT`) or fix the address"
        ) from None
