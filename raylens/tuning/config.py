"""Typed configuration of the tune section of an experiment spec."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raylens.trainer.config import ModelConfig

if TYPE_CHECKING:
    from raylens.trainer.config import TrainConfig


class CandidateConfig(BaseModel):
    """One model a sweep selects among: its model section and the space searched for it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """How the leaderboard and the trials name it; default: family.name (e.g. sklearn.random_forest)."""
    model: ModelConfig
    """The model section, as the spec's model section is written (family, name, params)."""
    space: dict[str, str] = Field(default_factory=dict)
    """This candidate's own paths to distributions (model.params..., train...), searched only
    in its trials; tune.space's train paths are searched for every candidate."""

    @property
    def label(self) -> str:
        return self.name or f"{self.model.family}.{self.model.name}"


class ConstraintsConfig(BaseModel):
    """What the winner of an algorithm selection must meet; trials that miss are ranked, not chosen."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    predict_p95_ms: float | None = Field(None, gt=0)
    """The 95th percentile of one row's prediction time, in milliseconds."""
    model_mb: float | None = Field(None, gt=0)
    """The fitted model's size (weights, or the pickled estimator), in MB."""


class ObjectiveConfig(BaseModel):
    """A further objective of a multi-objective search, beside tune.metric."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    metric: str
    """A metric every trial reports (valid_loss, train_rss_mb, ...) or time_total_s, the trial's
    training time."""
    mode: Literal["min", "max"] = "min"
    """min for losses, times and sizes, max for scores."""


class TuneConfig(BaseModel):
    """A hyperparameter sweep: which values to try, how many trials, how to stop bad ones early."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    trials: int = Field(8, ge=1)
    """Number of configurations sampled from the space."""
    concurrency: int = Field(2, ge=1)
    """Trials running at once (upper bound: raylens lowers it to what the cluster can hold)."""
    search: Literal["random", "grid", "tpe"] = "random"
    """random: sampling from the space, seeded; grid: every combination of the choice() values
    once (tune.trials is not used); tpe: Optuna's Tree-structured Parzen Estimator (through Ray
    Tune's OptunaSearch), seeded, which samples where earlier trials scored well after random
    starts (a quarter of tune.trials, 2 to 10)."""
    scheduler: Literal["asha", "hyperband", "median", "pbt", "fifo"] = "asha"
    """asha: stop trials that trail their peers at epoch milestones, judged in trial order so the
    same seed stops the same trials (raylens/tuning/halving.py); hyperband: Ray Tune's HyperBand
    brackets; median: stop a trial whose best result trails the median of the others at the same
    epoch (Ray Tune's median stopping rule); pbt: population based training (Ray Tune's): every
    grace_period epochs the trailing quarter of the trials go on from a leading trial's
    checkpoint with its train. values perturbed (torch models; a trial of several workers starts
    a Ray Train run from the checkpoint); fifo: run every trial to the end."""
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
    """Logical CPUs reserved per trial of one worker (also its threads: PyTorch's, or a
    scikit-learn estimator's n_jobs). A trial of several workers takes train.scaling's."""
    workers_per_trial: int = Field(1, ge=1)
    """1: a trial trains in its own process; more: each trial launches a Ray Train run of that size."""
    space: dict[str, str] = Field(default_factory=dict)
    """Dotted spec paths to distributions, e.g. train.optimizer.lr: "loguniform(1e-4, 1e-1)"."""
    candidates: list[CandidateConfig] = Field(default_factory=list)
    """Algorithm selection: the models one sweep chooses among (each with its own space), e.g.
    scikit-learn estimators beside a torch network; empty: the spec's model section alone."""
    constraints: ConstraintsConfig | None = None
    """Limits the chosen model must meet (prediction latency, size); the leaderboard says which
    trials meet them."""
    trial_retries: int = Field(0, ge=0)
    """Times a trial that fails (an error, a lost worker) is retried from its last checkpoint
    before it is recorded failed; the sweep goes on either way."""
    warm_start: str | None = None
    """The sweep run id of an earlier sweep (as `raylens tune` printed it), or an MLflow
    experiment's name (its latest finished sweep, e.g. the spec's name): its finished trials
    seed the searcher (tune.search: tpe, or tune.candidates), so this sweep starts where that
    one left off; values outside this sweep's space are dropped with a note (a widened space
    keeps them all). The metric must be the same."""
    objectives: list[ObjectiveConfig] = Field(default_factory=list)
    """Further objectives searched for beside tune.metric (e.g. [{metric: time_total_s, mode: min}]):
    Optuna's multi-objective TPE (tune.search: tpe) samples towards their Pareto front, which the
    leaderboard shows; the winner is the front's best on tune.metric."""
    time_budget_s: float | None = Field(None, gt=0)
    """Stop starting trials after this many seconds (running ones stop too); the best so far wins."""
    goal: float | None = Field(None, allow_inf_nan=False)
    """End the sweep at the first result whose tune.metric is this good (at least the goal for
    mode max, at most for min; Katib's objective.goal, SageMaker's TargetObjectiveMetricValue):
    that trial ends there, running trials stop, no more start; the best so far wins."""

    def cpus_per_worker(self, train: TrainConfig) -> float:
        """Logical CPUs of each of a trial's workers: tune.cpus_per_trial for a trial of one
        worker (its own process), train.scaling's for the workers of a trial's Ray Train run."""
        return self.cpus_per_trial if self.workers_per_trial == 1 else train.scaling.cpus_per_worker

    def reaches_goal(self, metrics: Mapping[str, Any]) -> bool:
        """Whether a result's tune.metric meets tune.goal (never, without a goal)."""
        value = metrics.get(self.metric)
        if self.goal is None or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        return value >= self.goal if self.mode == "max" else value <= self.goal

    @model_validator(mode="after")
    def _distinct_objectives(self) -> TuneConfig:
        names = [self.metric, *(o.metric for o in self.objectives)]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(
                f"tune.objectives: {', '.join(twice)} is an objective twice (tune.metric is the first); "
                "list each metric once"
            )
        return self

    @model_validator(mode="after")
    def _distinct_candidates(self) -> TuneConfig:
        labels = [c.label for c in self.candidates]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(
                f"tune.candidates: {', '.join(twice)} named twice; give each candidate its own name"
            )
        return self
