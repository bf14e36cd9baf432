"""The run folder: where embedded defaults keep the feature store, Ray storage and MLflow.

raylens-runs/
    features/      the offline store (versioned Parquet feature sets)
    ray/           Ray Train and Tune storage: checkpoints, trial state, each run's record
    mlflow.db      the MLflow tracking store (SQLite) ...
    mlartifacts/   ... and its artifacts

The folder is a local or network path, or object storage (``s3://bucket/runs``, ``gs://…``:
``raylens.storage``). On object storage there is no SQLite store: runs are tracked on an MLflow
server (``tracking.uri``, ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from raylens.errors import UserError
from raylens.storage import Location

DEFAULT_ROOT = Path("raylens-runs")


@dataclass(frozen=True)
class Workspace:
    root: Location
    given: bool = True
    """Whether the user named the folder (--runs-dir), or it is the default in the working one."""

    @classmethod
    def at(cls, root: str | Path | Location | None = None) -> Workspace:
        return cls(Location.of(root if root is not None else DEFAULT_ROOT), given=root is not None)

    @property
    def feature_store(self) -> Location:
        return self.root / "features"

    @property
    def online_store(self) -> Path:
        """The embedded online store (SQLite): a local file, as SQLite needs one."""
        if not self.root.local:
            raise UserError(
                f"the online store is a SQLite file, and the run folder {self.root.uri} is not local: "
                "pass --online-store PATH on this machine"
            )
        return self.root.local_path / "online.db"

    @property
    def ray_storage(self) -> Location:
        return self.root / "ray"

    @property
    def artifact_root(self) -> Path:
        return self.root.local_path / "mlartifacts"

    @property
    def default_tracking_uri(self) -> str | None:
        """The run folder's SQLite store; none on object storage, where SQLite cannot live."""
        if not self.root.local:
            return None
        # Absolute: Ray workers run in other folders, and a relative URI would give each its own db.
        return f"sqlite:///{self.root.local_path / 'mlflow.db'}"

    def holds_no_store(self, tracking_uri: str) -> bool:
        """Whether ``tracking_uri`` is this run folder's SQLite store and it does not exist yet
        (opening it would create it: a read must not)."""
        return tracking_uri == self.default_tracking_uri and not (self.root / "mlflow.db").exists()

    def tracking_uri(self, configured: str, environ: Mapping[str, str] | None = None) -> str:
        """The spec's tracking URI; for "default", MLflow's own ``MLFLOW_TRACKING_URI`` when set
        (how a submitted job gets its server's address without the address, which may carry
        credentials, entering the spec, its params or artifacts), else the run folder's SQLite."""
        if configured != "default":
            return configured
        from_env = (os.environ if environ is None else environ).get("MLFLOW_TRACKING_URI", "").strip()
        if from_env:
            return from_env
        if self.default_tracking_uri is None:
            raise UserError(
                f"--runs-dir {self.root} is object storage, where no SQLite tracking store can live; "
                "give an MLflow server: --tracking-uri http://HOST:5000, MLFLOW_TRACKING_URI or tracking.uri"
            )
        return self.default_tracking_uri
