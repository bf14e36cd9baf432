"""The spec's delivery sections: the quality gate (``release``), the endpoint (``serve``) and
continuous training (``ct``). Light to import: the spec is validated before Ray or MLflow load."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GATE_METRICS = {
    "classification": {"accuracy": "max", "log_loss": "min"},
    "regression": {"rmse": "min", "mae": "min"},
}
"""What the gate can compare row by row on the test split, and which way is better."""


class ReleaseConfig(BaseModel):
    """``raylens pipeline``: when a new version may replace production."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    metric: Literal["accuracy", "log_loss", "rmse", "mae"] | None = None
    """Test metric the gate compares; default: accuracy for classification, rmse for regression."""
    margin: float = Field(0.0, ge=0)
    """The candidate must beat production by more than this (in the metric's units) with the
    lower end of the bootstrap confidence interval of the difference, not its point estimate."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Level of the paired bootstrap confidence interval of candidate minus production."""
    resamples: int = Field(1000, ge=100)
    """Bootstrap resamples of the test rows (the same rows for both models: paired)."""
    seed: int = 0
    """Seeds the resampling: the same models and rows give the same verdict."""
    threshold: float | None = None
    """Absolute bound the candidate's metric must meet (at least, for accuracy; at most, for losses
    and errors); the only check of a first release, when there is no production to beat."""
    max_latency_ms: float | None = Field(None, gt=0)
    """Bound on the median time the registered model takes to score one row (one request)."""
    max_size_mb: float | None = Field(None, gt=0)
    """Bound on the registered model's artifacts on disk."""
    approval: Literal["auto", "manual"] = "auto"
    """auto: a candidate that passes the gate and the staging smoke test becomes production;
    manual: it stays at staging until `raylens pipeline --approve` or `raylens promote`."""


class ServeConfig(BaseModel):
    """``raylens serve`` and the pipeline's staging endpoint: a Ray Serve application."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Interface the HTTP proxy listens on; 0.0.0.0 exposes the model to the network."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port (0: a free one)."""
    replicas: int = Field(1, ge=1)
    """Replicas of the model (each a Ray actor holding the model); the minimum with autoscaling."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscale between replicas and this many on ongoing requests (Ray Serve's autoscaler)."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Autoscaling: ongoing requests per replica the autoscaler aims at."""
    max_batch_size: int = Field(64, ge=1)
    """Requests batched into one model call (Ray Serve's @serve.batch)."""
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    """How long a batch waits for more requests before the model is called."""
    max_request_rows: int = Field(1000, ge=1)
    """Rows one request may hold; more is refused with HTTP 413."""
    poll_s: float = Field(5.0, gt=0)
    """How often a replica serving an alias checks where the alias points, and switches."""
    cpus_per_replica: float = Field(1.0, gt=0)
    """Logical CPUs each replica reserves."""

    @model_validator(mode="after")
    def _max_at_least_min(self) -> ServeConfig:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas}); "
                "raise max_replicas or leave it out"
            )
        return self


class ContinuousTrainingConfig(BaseModel):
    """``raylens ct check``: when new data is different enough to train again."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    psi: float = Field(0.2, gt=0)
    """Retrain when a feature's population stability index reaches this (0.2: a real shift)."""
    ks: float = Field(0.2, gt=0, le=1)
    """Retrain when a feature's Kolmogorov-Smirnov statistic reaches this."""
    row_growth: float = Field(0.5, gt=0)
    """Retrain when the data has grown by this fraction of the rows production was trained on."""
    schema_change: bool = True
    """Retrain when the source's columns or their types changed."""


def check_embedded_capacity(config: ServeConfig) -> None:
    """Replicas an embedded Ray (this machine alone) can never hold would leave the deployment
    waiting forever: refused before Ray starts. (A cluster given by address may autoscale.)"""
    from raylens.cluster.runtime import embedded_cpus
    from raylens.errors import UserError

    need, have = config.replicas * config.cpus_per_replica, embedded_cpus()
    if need > have:
        raise UserError(
            f"serve: {config.replicas} replicas x {config.cpus_per_replica:g} CPU need {need:g} CPUs, and "
            f"Ray on this machine has {have}: lower the replicas or cpus_per_replica, or pass --address "
            "of a cluster that has them"
        )
