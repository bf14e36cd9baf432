"""The run folder: where embedded defaults keep the feature store, Ray storage and MLflow.

raylens-runs/
    features/      the offline store (versioned Parquet feature sets)
    ray/           Ray Train and Tune storage: checkpoints, trial state
    mlflow.db      the MLflow tracking store (SQLite) ...
    mlartifacts/   ... and its artifacts
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("raylens-runs")


@dataclass(frozen=True)
class Workspace:
    root: Path
    given: bool = True
    """Whether the user named the folder (--runs-dir), or it is the default in the working one."""

    @classmethod
    def at(cls, root: Path | None = None) -> Workspace:
        return cls((root or DEFAULT_ROOT).expanduser().resolve(), given=root is not None)

    @property
    def feature_store(self) -> Path:
        return self.root / "features"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def artifact_root(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def default_tracking_uri(self) -> str:
        # Absolute: Ray workers run in other folders, and a relative URI would give each its own db.
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def tracking_uri(self, configured: str, environ: Mapping[str, str] | None = None) -> str:
        """The spec's tracking URI; for "default", MLflow's own ``MLFLOW_TRACKING_URI`` when set
        (how a submitted job gets its server's address without the address, which may carry
        credentials, entering the spec, its params or artifacts), else the run folder's SQLite."""
        if configured != "default":
            return configured
        from_env = (os.environ if environ is None else environ).get("MLFLOW_TRACKING_URI", "").strip()
        return from_env or self.default_tracking_uri

    def ensure(self) -> None:
        for folder in (self.root, self.feature_store, self.ray_storage, self.artifact_root):
            folder.mkdir(parents=True, exist_ok=True)
