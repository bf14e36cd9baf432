"""Typed configuration of the tune section of an experiment spec."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TuneConfig(BaseModel):
    """A hyperparameter sweep: which values to try, how many trials, how to stop bad ones early."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    trials: int = Field(8, ge=1)
    """Number of configurations sampled from the space."""
    concurrency: int = Field(2, ge=1)
    """Trials running at once (upper bound: raylens lowers it to what the cluster can hold)."""
    search: Literal["random"] = "random"
    """Search algorithm: random sampling from the space, seeded."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha: stop trials that trail their peers at epoch milestones, judged in trial order so the
    same seed stops the same trials (raylens/tuning/halving.py); fifo: run every trial to the end."""
    metric: str = "valid_loss"
    """Metric the sweep optimizes, as reported each epoch (valid_loss, valid_accuracy, ...)."""
    mode: Literal["min", "max"] = "min"
    """min for losses and errors, max for accuracy, F1 and R²."""
    epochs: int | None = Field(None, ge=1)
    """Epochs each trial trains at most; default: train.epochs. The final run trains train.epochs."""
    grace_period: int = Field(1, ge=1)
    """asha: epochs every trial runs before it may be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """asha: 1/reduction_factor of the trials go on at each milestone."""
    seed: int = 0
    """Seed of the search: the same seed samples the same configurations."""
    cpus_per_trial: float = Field(1.0, gt=0)
    """Logical CPUs reserved per trial (also its PyTorch thread count)."""
    workers_per_trial: int = Field(1, ge=1)
    """1: a trial trains in its own process; more: each trial launches a Ray Train run of that size."""
    space: dict[str, str] = Field(default_factory=dict)
    """Dotted spec paths to distributions, e.g. train.optimizer.lr: "loguniform(1e-4, 1e-1)"."""
