"""Typed configuration of the model and train sections of an experiment spec."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

from raylens.trainer.debug.settings import DebugConfig

BUILTIN_MODELS = ("mlp", "cnn1d")
BUILTIN_ESTIMATORS = (
    "logistic_regression",
    "linear_regression",
    "random_forest",
    "hist_gradient_boosting",
    "svm",
    "knn",
    "sgd",
)
"""scikit-learn estimators known by a short name; each picks its classifier or regressor from
the feature set's task (raylens/trainer/sklearn_family.py)."""
FAMILIES = ("torch", "sklearn")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class TorchModelConfig(_Strict):
    """A PyTorch module trained by raylens' loop, distributed by Ray Train."""

    family: Literal["torch"] = "torch"
    """Model family: torch (a PyTorch module) or sklearn (a scikit-learn estimator)."""
    name: str = "mlp"
    """A built-in model (mlp, cnn1d) or a user factory as "package.module:function"."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the model's constructor (e.g. hidden: [128, 64])."""

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in BUILTIN_MODELS and ":" not in name:
            raise ValueError(
                f"'{name}' is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
                "nor a factory written as 'package.module:function'"
            )
        return name


class SklearnModelConfig(_Strict):
    """A scikit-learn estimator fitted in one process on the feature set's training split."""

    family: Literal["sklearn"] = "sklearn"
    """Model family: torch (a PyTorch module) or sklearn (a scikit-learn estimator)."""
    name: str = "random_forest"
    """A built-in estimator (logistic_regression, linear_regression, random_forest,
    hist_gradient_boosting, svm, knn, sgd: the classifier or regressor the task needs) or any
    estimator class as "package.module:Class" (e.g. sklearn.ensemble:ExtraTreesClassifier)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the estimator (e.g. max_depth: 8); random_state is train.seed unless given."""

    @field_validator("name")
    @classmethod
    def _known_estimator(cls, name: str) -> str:
        if name not in BUILTIN_ESTIMATORS and ":" not in name:
            raise ValueError(
                f"'{name}' is neither a built-in estimator ({', '.join(BUILTIN_ESTIMATORS)}) "
                "nor an estimator class written as 'package.module:Class'"
            )
        return name


def _family_of(value: Any) -> str:
    """The family a model section names; torch when it names none (specs written before there
    were families). An unknown family is left to fail with the valid ones listed."""
    family = value.get("family", "torch") if isinstance(value, dict) else getattr(value, "family", "torch")
    return str(family)


ModelConfig = Annotated[
    Annotated[TorchModelConfig, Tag("torch")] | Annotated[SklearnModelConfig, Tag("sklearn")],
    Discriminator(
        _family_of,
        custom_error_type="model_family",
        custom_error_message=f"model.family must be one of {', '.join(FAMILIES)}",
    ),
]
"""The model section: one config per family, chosen by its ``family`` key."""
AnyModelConfig = TorchModelConfig | SklearnModelConfig
"""What a ``ModelConfig`` validates to."""

_MODEL_ADAPTER: TypeAdapter[AnyModelConfig] = TypeAdapter(ModelConfig)


def parse_model_config(raw: Any) -> AnyModelConfig:
    """A model section (a mapping, or a config already) validated as its family's config."""
    return _MODEL_ADAPTER.validate_python(raw)


class OptimizerConfig(_Strict):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """torch.optim.AdamW, Adam or SGD."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """L2 penalty (decoupled for AdamW), as torch.optim takes it."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Used by sgd only."""


class PipelineConfig(_Strict):
    """How a pipelined model is cut into stages (one per worker) and fed (strategy: pipeline)."""

    schedule: Literal["1f1b", "gpipe"] = "1f1b"
    """1f1b: each stage alternates one forward and one backward once the pipe is full (activations
    of at most `workers` microbatches held); gpipe: all forwards, then all backwards."""
    microbatches: int = Field(4, ge=1)
    """Each batch is cut into this many microbatches that flow through the stages one after the
    other; train.batch_size must be a multiple of it (1f1b: at least one per stage)."""
    split_points: list[str] | None = None
    """Names of the modules where a stage begins (as in model.named_modules(), e.g. net.4);
    workers - 1 of them are used, chosen to balance the stages' parameters. null: the model's
    own (built-in models declare theirs; a user model may set an attribute
    pipeline_split_points)."""


class ScalingConfig(_Strict):
    """How many Ray Train workers train the final model, and how the model is distributed."""

    workers: int | tuple[int, int] = 1
    """Number of training workers (processes). 1 on CPU on embedded Ray trains in the raylens
    process itself (no worker group to start); elsewhere in one Ray Train worker, without DDP.
    [min, max]: elastic (Ray Train's num_workers=(min, max)): the run starts with as many as
    the cluster has room for, at least min, and goes on with fewer after losing some."""
    strategy: Literal["ddp", "fsdp", "pipeline", "auto"] = "auto"
    """ddp: replicate the model, average gradients; fsdp: shard parameters across workers;
    pipeline: cut the model into one stage per worker, microbatches flowing through them
    (train.scaling.pipeline); auto: ddp while a replica's training state (16 bytes per
    parameter) takes at most half of a worker's memory, else fsdp, and on embedded Ray (one
    machine) several CPU workers whose replica fits train as one process with all their CPUs;
    the choice and its reason are printed and tagged."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Logical CPUs Ray reserves for each worker; also its PyTorch thread count (rounded, >= 1)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL between them."""
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    """strategy: pipeline only: the schedule, microbatches and where stages begin."""

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_or_range(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"write a number of workers or [min, max], got {value!r}")
            low, high = value
            if not 1 <= low <= high:
                raise ValueError(
                    f"[{low}, {high}] is not a range of workers: write [min, max] with 1 <= min <= max"
                )
            return (low, high) if low < high else low
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"a run needs at least 1 worker, got {value}")
        return value

    @property
    def min_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def max_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[1]

    @property
    def shown_workers(self) -> str:
        """How the terminal says it: ``2``, or ``2-4 (elastic)``."""
        return (
            str(self.workers)
            if isinstance(self.workers, int)
            else f"{self.min_workers}-{self.max_workers} (elastic)"
        )

    @model_validator(mode="after")
    def _strategy_fits(self) -> ScalingConfig:
        if self.strategy == "fsdp" and self.min_workers < 2:
            raise ValueError(
                "fsdp shards the model across workers and needs workers >= 2: set train.scaling.workers"
            )
        if self.strategy == "pipeline":
            if not isinstance(self.workers, int):
                raise ValueError(
                    "a pipeline has one stage per worker, fixed for the run: set train.scaling.workers "
                    "to a number, not a range"
                )
            if self.workers < 2:
                raise ValueError(
                    "pipeline cuts the model into one stage per worker and needs workers >= 2: set "
                    "train.scaling.workers"
                )
            pipeline = self.pipeline
            if pipeline.schedule == "1f1b" and pipeline.microbatches < self.workers:
                raise ValueError(
                    f"pipeline.microbatches ({pipeline.microbatches}) is fewer than the stages "
                    f"({self.workers}): 1f1b needs one microbatch per stage in flight; raise it, or "
                    "use schedule: gpipe"
                )
            points = pipeline.split_points
            if points is not None and len(points) < self.workers - 1:
                raise ValueError(
                    f"pipeline.split_points names {len(points)} point(s) for {self.workers} stages, "
                    f"which need {self.workers - 1}: name more, or use fewer workers"
                )
        return self


class ScheduleConfig(_Strict):
    """How the learning rate moves over the run, set before every optimizer step from
    train.optimizer.lr (the peak)."""

    name: Literal["constant", "cosine", "linear", "step"] = "constant"
    """constant; cosine or linear: from the peak down to min_lr_ratio x lr at the run's last step;
    step: multiplied by gamma every step_epochs epochs."""
    warmup_epochs: float = Field(0.0, ge=0)
    """Linear warmup from 0 to the peak over this many epochs (fractions allowed), then the schedule."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """cosine and linear: the last learning rate, as a fraction of the peak."""
    step_epochs: int | None = Field(None, ge=1)
    """step: epochs between two decays."""
    gamma: float = Field(0.1, gt=0, le=1)
    """step: the factor of each decay."""


class EarlyStoppingConfig(_Strict):
    """Stop training when a validation metric has not improved for a while."""

    metric: str = "valid_loss"
    """A metric reported each epoch (see `raylens spec`)."""
    mode: Literal["min", "max"] = "min"
    """min: lower is better; max: higher is better."""
    patience: int = Field(3, ge=1)
    """Epochs without improvement before the run stops."""
    min_delta: float = Field(0.0, ge=0)
    """How much better than the best so far an epoch must be to count as an improvement."""


class BestCheckpointConfig(_Strict):
    """Keep the best checkpoints by a validation metric, and register the best one's model."""

    metric: str = "valid_loss"
    """A validation metric reported with every checkpoint (valid_...; see `raylens spec`)."""
    mode: Literal["min", "max"] = "min"
    """min: lower is better; max: higher is better."""


ClassWeights = Literal["balanced"] | dict[str, float] | None
"""How classes weigh in the training loss: ``None`` (equally), ``"balanced"`` or ``{label: weight}``."""


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    """Passes over the training split of the final training."""
    batch_size: int = Field(128, ge=1)
    """Per worker: with N workers, one optimizer step sees N x batch_size rows (pipeline: the
    stages share one batch, batch_size rows per step)."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """The optimizer and its learning rate."""
    seed: int = 0
    """Seeds model initialisation and shuffling; the same seed gives the same model."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    """Workers, parallel strategy and resources per worker."""
    checkpoints_to_keep: int = Field(2, ge=1)
    """Checkpoints kept on storage: the latest ones, or with best_checkpoint the best ones (and
    the latest, which a resume starts from)."""
    best_checkpoint: BestCheckpointConfig | None = None
    """Keep the best checkpoints by a validation metric, and register the model of the best one
    (tagged raylens.model_epoch) rather than the last; null: the latest ones, the last model."""
    max_failures: int = Field(2, ge=0)
    """Worker-group failures survived by restarting from the latest checkpoint."""
    class_weights: ClassWeights = None
    """Classification only: each class's weight in the training loss (cross-entropy). null: all
    classes weigh the same; "balanced": rows / (classes x rows of the class) on the training split,
    as scikit-learn's class_weight="balanced"; or a mapping {label: weight > 0}, labels written as
    the target's values (YAML may give 1: 5.0), unlisted classes weighing 1. train_loss and
    valid_loss are the weighted loss; test_log_loss is not weighted."""

    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """The learning-rate schedule (per optimizer step) and its warmup."""
    accumulate_batches: int = Field(1, ge=1)
    """Batches whose gradients add up before one optimizer step: batch_size x accumulate_batches
    rows per step and worker, in the memory of one batch."""
    clip_grad_norm: float | None = Field(None, gt=0)
    """Clip the gradients' total norm to this before each step; the epoch's mean norm before
    clipping is reported as train_grad_norm."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: forward and loss under torch.autocast(bfloat16) (CPU and GPU); weights, optimizer
    and evaluation stay float32."""
    eval_every_steps: int | None = Field(None, ge=1)
    """Also validate, report and checkpoint every this many optimizer steps within an epoch (for
    long epochs): a resume goes on from the latest of them, mid-epoch. Every report then carries
    `step`, and MLflow logs the run's metrics by optimizer step instead of by epoch. Sweep trials
    validate after epochs only (their halving rungs count epochs)."""
    data: Literal["memory", "ray_data"] = "memory"
    """How the final training reads its training split. memory: each worker maps the whole split
    (memory-mapped Parquet; a sweep's trials share one copy in Ray's object store); ray_data: Ray
    Data streams it from the store, a shard per worker, in batches of one fixed-size tensor
    column, locally shuffled per epoch (a split larger than a worker's memory; torch models, ddp
    or fsdp, checkpoints at epoch ends). Sweep trials read it from memory either way."""
    step_timeout_s: float | None = Field(600.0, gt=0)
    """Seconds a Ray Train worker may go without finishing a batch (a hung collective, a stalled
    data read, a blocked model) before its attempt fails, naming the rank; the run restarts
    from its latest checkpoint (max_failures). Validation and checkpointing are not timed.
    null: no limit."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop when the metric stops improving; the final model is the last epoch's."""
    debug: DebugConfig | None = Field(default_factory=DebugConfig)
    """The debugger (torch models): captures per-layer and per-step statistics every few steps
    and judges them with rules that record, warn, stop or fail the run; null: off."""

    @model_validator(mode="after")
    def _microbatches_divide_the_batch(self) -> TrainConfig:
        microbatches = self.scaling.pipeline.microbatches
        if self.scaling.strategy == "pipeline" and self.batch_size % microbatches:
            raise ValueError(
                f"batch_size ({self.batch_size}) is not a multiple of scaling.pipeline.microbatches "
                f"({microbatches}): every microbatch has batch_size / microbatches rows; change either"
            )
        return self

    @model_validator(mode="after")
    def _streams_what_it_can(self) -> TrainConfig:
        if self.data != "ray_data":
            return self
        if self.scaling.strategy == "pipeline":
            raise ValueError(
                "data: ray_data deals each worker its own rows, and a pipeline's stages share every "
                "batch: use data: memory with strategy: pipeline"
            )
        if self.eval_every_steps is not None:
            raise ValueError(
                "data: ray_data streams an epoch once, so a run cannot resume in the middle of one: "
                "leave out eval_every_steps (checkpoints come at epoch ends) or use data: memory"
            )
        return self

    @model_validator(mode="after")
    def _schedule_fits_the_run(self) -> TrainConfig:
        schedule = self.schedule
        if schedule.warmup_epochs >= self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs ({schedule.warmup_epochs}) must end before the run does "
                f"(train.epochs {self.epochs}); shorten the warmup or train longer"
            )
        if schedule.name == "step" and schedule.step_epochs is None:
            raise ValueError("schedule.step_epochs: the step schedule needs the epochs between decays")
        if (
            schedule.name == "step"
            and schedule.step_epochs is not None
            and schedule.step_epochs >= self.epochs
        ):
            raise ValueError(
                f"schedule.step_epochs ({schedule.step_epochs}) is not shorter than the run "
                f"(train.epochs {self.epochs}): the rate would never decay; lower it or train longer"
            )
        return self

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights_by_label(cls, value: Any) -> Any:
        if value is None or value == "balanced":
            return value
        if not isinstance(value, dict):
            raise ValueError(f"use null, 'balanced' or a mapping {{label: weight}}, got {value!r}")
        for label, weight in value.items():
            ok = isinstance(weight, int | float) and not isinstance(weight, bool)
            if not ok or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"the weight of class {label!r} must be a number > 0, got {weight!r}")
        # Labels are matched to the feature set's classes by str(label): YAML reads `1:` as an int.
        return {str(k): float(v) for k, v in value.items()}
