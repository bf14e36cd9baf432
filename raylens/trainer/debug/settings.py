"""The spec's ``train.debug`` section: how often the debugger captures the run's state, and the
rules judging it, each with its thresholds and what it does when it fires."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RuleAction = Literal["off", "record", "warn", "stop", "fail"]
"""What a rule does when it fires. record: kept with the run (MLflow tags, the debug report);
warn: also said on the terminal as it happens; stop: ends the run (a sweep's trial: stopped,
the sweep goes on) as finished; fail: ends the run as failed, the finding its reason."""


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    action: RuleAction = "warn"
    """off, record, warn, stop or fail."""


class VanishingGradient(_Rule):
    """A layer's gradient norm is below ``ratio`` x the largest layer's: the layers before it
    barely learn (deep sigmoid or tanh stacks without normalization)."""

    ratio: float = Field(1e-4, gt=0, lt=1)
    """Fires below this fraction of the largest layer's gradient norm."""


class ExplodingTensor(_Rule):
    """A gradient or weight holds NaN or Inf, or a layer's gradient norm exceeds ``limit``."""

    limit: float = Field(1e4, gt=0)
    """The largest healthy gradient norm of a layer."""


class SaturatedActivation(_Rule):
    """More than ``fraction`` of a sigmoid or tanh layer's outputs are saturated (within 1 % of
    their bounds), where their gradient vanishes."""

    fraction: float = Field(0.5, gt=0, le=1)
    """The largest healthy share of saturated outputs."""


class DeadRelu(_Rule):
    """More than ``fraction`` of a ReLU layer's outputs are zero: its units no longer learn."""

    fraction: float = Field(0.9, gt=0, le=1)
    """The largest healthy share of zero outputs."""


class UpdateRatio(_Rule):
    """The median layer's update/weight norm ratio of one optimizer step is outside
    [``low``, ``high``] (about 1e-3 is healthy): the learning rate is too low or too high."""

    action: RuleAction = "record"
    """off, record, warn, stop or fail."""
    low: float = Field(1e-6, gt=0)
    """The smallest healthy ratio."""
    high: float = Field(0.1, gt=0)
    """The largest healthy ratio."""

    @model_validator(mode="after")
    def _ordered(self) -> UpdateRatio:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        return self


class StepSize(_Rule):
    """The median of Cockpit's step size alpha over the last ``captures`` captures is above
    ``high`` (the steps overshoot the loss's minimum along their direction: the learning rate is
    too high) or, where ``low`` is set, below it (they cover a sliver of the way: too low). alpha
    is -1 where a step began, 0 at the minimum along it, 1 at the same loss on the far side; it
    needs train.debug.every of 2 or more."""

    action: RuleAction = "record"
    """off, record, warn, stop or fail."""
    low: float | None = None
    """The smallest healthy median alpha, e.g. -0.95; None: that side is not judged (minibatch
    noise alone pulls alpha towards -1, so small steps and noisy ones look alike)."""
    high: float = 1.0
    """The largest healthy median alpha."""
    captures: int = Field(5, ge=1)
    """Captures the median is taken over (alpha is measured on one batch pair: it is noisy)."""

    @model_validator(mode="after")
    def _ordered(self) -> StepSize:
        if self.low is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        return self


class UnchangedTensor(_Rule):
    """A trainable layer's weights are all zero, or its optimizer step left them unchanged."""


class Overfit(_Rule):
    """valid_loss has not improved on its best for ``patience`` epochs while train_loss kept
    falling."""

    patience: int = Field(3, ge=1)
    """Epochs since valid_loss's best."""


class LossNotDecreasing(_Rule):
    """train_loss has not fallen below its best by ``min_delta`` (relative) for ``patience``
    epochs."""

    patience: int = Field(3, ge=1)
    """Epochs without a new best."""
    min_delta: float = Field(0.001, ge=0, lt=1)
    """How much lower than the best (a fraction of it) counts as new."""


class Overtraining(_Rule):
    """valid_loss has not improved on its best for ``patience`` epochs: the epochs since are
    spent for nothing."""

    action: RuleAction = "record"
    """off, record, warn, stop or fail."""
    patience: int = Field(5, ge=1)
    """Epochs since valid_loss's best."""


class ClassImbalance(_Rule):
    """The rarest class of the training rows is under ``ratio`` x the most common one's count
    (classification)."""

    ratio: float = Field(0.1, gt=0, lt=1)
    """The smallest healthy count of the rarest class, as a fraction of the most common one's."""


class PoorWeightInitialization(_Rule):
    """Before the first step, a Linear or convolution layer's weights have a standard deviation
    x sqrt(fan-in) outside [``low``, ``high``] (PyTorch's default gives about 0.58, He's 1.41):
    its outputs start vanishingly small or far too large."""

    low: float = Field(0.1, gt=0)
    """The smallest healthy scale."""
    high: float = Field(4.0, gt=0)
    """The largest healthy scale."""


class IoBottleneck(_Rule):
    """Waiting for data takes more than ``share`` of the step time."""

    share: float = Field(0.5, gt=0, lt=1)
    """The largest healthy share of step time spent waiting for data."""


class LoadImbalance(_Rule):
    """One rank spends more than ``factor`` x another's time per batch outside backward (loading
    data, forward, the optimizer step: its own work; the others wait for it in backward's
    all-reduce). Judged from the second capture on."""

    factor: float = Field(1.5, gt=1)
    """How many times the quickest rank's time the slowest rank's may be."""
    min_ms: float = Field(5.0, ge=0)
    """Differences under this many milliseconds a batch are noise, whatever their ratio."""


class SlowInitialization(_Rule):
    """The worker took more than ``seconds`` from its start (building and distributing the model,
    restoring a checkpoint, moving data to the device) to its first step."""

    seconds: float = Field(300.0, gt=0)
    """The longest healthy start."""


class CpuBottleneck(_Rule):
    """A GPU run's process keeps its CPUs over ``cpu`` busy while the GPU is under ``gpu`` busy:
    the host (data preparation, Python overhead) holds the device back. Never fires on CPU."""

    cpu: float = Field(0.9, gt=0, le=1)
    """CPU utilization (of the CPUs this process may use) from which the host counts as busy."""
    gpu: float = Field(0.3, gt=0, le=1)
    """GPU utilization under which the device counts as starved."""


class LowGpuUtilization(_Rule):
    """The GPU was busy less than ``gpu`` of the time at each of the last ``captures`` captures.
    Never fires on CPU, nor where the GPU's utilization cannot be read (no NVML)."""

    gpu: float = Field(0.3, gt=0, le=1)
    """GPU utilization under which the device counts as idle."""
    captures: int = Field(3, ge=1)
    """Consecutive captures under it before the rule fires."""


class StepTimeOutlier(_Rule):
    """A step took more than ``factor`` x the median step time of its capture window."""

    action: RuleAction = "record"
    """off, record, warn, stop or fail."""
    factor: float = Field(10.0, gt=1)
    """How many times the median batch a batch may take."""


class GrowingMemory(_Rule):
    """The process's memory grew at each of the last ``captures`` captures, by more than ``mb``
    MiB in all: something keeps tensors alive across steps."""

    captures: int = Field(4, ge=2)
    """Consecutive captures with more memory than the one before."""
    mb: float = Field(256.0, gt=0)
    """Growth over those captures, in MiB, beyond which the rule fires."""


def _as_settings(value: Any) -> Any:
    if isinstance(value, str):
        return {"action": value}
    if value is None or value is False:
        return {"action": "off"}
    return value


class RulesConfig(BaseModel):
    """Each rule's action and thresholds, over its defaults. A rule given as an action alone
    (overfit: stop) keeps its default thresholds; off turns it off."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    vanishing_gradient: VanishingGradient = Field(default_factory=VanishingGradient)
    """A layer's gradient norm far below the largest layer's."""
    exploding_tensor: ExplodingTensor = Field(default_factory=ExplodingTensor)
    """NaN or Inf in gradients or weights, or a huge gradient norm."""
    saturated_activation: SaturatedActivation = Field(default_factory=SaturatedActivation)
    """Most of a sigmoid or tanh layer's outputs at their bounds."""
    dead_relu: DeadRelu = Field(default_factory=DeadRelu)
    """Most of a ReLU layer's outputs zero."""
    update_ratio: UpdateRatio = Field(default_factory=UpdateRatio)
    """The optimizer step's size against the weights', too small or too large."""
    step_size: StepSize = Field(default_factory=StepSize)
    """Steps overshooting the minimum along their direction, or barely moving towards it."""
    unchanged_tensor: UnchangedTensor = Field(default_factory=UnchangedTensor)
    """A trainable layer all zero, or left unchanged by a step."""
    overfit: Overfit = Field(default_factory=Overfit)
    """valid_loss stuck while train_loss falls."""
    loss_not_decreasing: LossNotDecreasing = Field(default_factory=LossNotDecreasing)
    """train_loss no longer falling."""
    overtraining: Overtraining = Field(default_factory=Overtraining)
    """valid_loss stuck for many epochs."""
    class_imbalance: ClassImbalance = Field(default_factory=ClassImbalance)
    """A class far rarer than another in the training rows."""
    poor_weight_initialization: PoorWeightInitialization = Field(default_factory=PoorWeightInitialization)
    """Weights initialized far too small or too large for their fan-in."""
    io_bottleneck: IoBottleneck = Field(default_factory=IoBottleneck)
    """Most of the step time spent waiting for data."""
    load_imbalance: LoadImbalance = Field(default_factory=LoadImbalance)
    """One rank much slower than the others."""
    slow_initialization: SlowInitialization = Field(default_factory=SlowInitialization)
    """A long wait from the worker's start to its first step."""
    cpu_bottleneck: CpuBottleneck = Field(default_factory=CpuBottleneck)
    """A busy host starving the GPU."""
    low_gpu_utilization: LowGpuUtilization = Field(default_factory=LowGpuUtilization)
    """A GPU mostly idle."""
    step_time_outlier: StepTimeOutlier = Field(default_factory=StepTimeOutlier)
    """A batch far slower than its window's median."""
    growing_memory: GrowingMemory = Field(default_factory=GrowingMemory)
    """Memory growing capture after capture."""

    @field_validator("*", mode="before")
    @classmethod
    def _bare_action(cls, value: Any) -> Any:
        return _as_settings(value)

    def active(self) -> dict[str, Any]:
        """The rules that are not off, by name."""
        return {
            name: getattr(self, name)
            for name in type(self).model_fields
            if getattr(self, name).action != "off"
        }


class DebugConfig(BaseModel):
    """Capture the run's state every few steps and judge it with rules (all on by default)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    every: int = Field(50, ge=1)
    """Optimizer steps between two captures (per-layer gradient and weight norms, update ratios,
    activation statistics, step-time breakdown, memory); a capture's rules judge it at once."""
    layers: list[str] = Field(default_factory=list)
    """Capture only these modules (names as in model.named_modules(), their children included);
    empty: every layer with weights and every activation module."""
    rules: RulesConfig = Field(default_factory=RulesConfig)
    """Each rule's action (off, record, warn, stop, fail) and thresholds."""
    tensors: list[str] = Field(default_factory=list)
    """Also keep these modules' full weights and gradients at every capture, on rank 0
    (debug/tensors.pt: {step: {"<layer>.<param>": tensor, "<layer>.<param>.grad": tensor}},
    torch.load it); names as in train.debug.layers."""
    profile_steps: int = Field(0, ge=0, le=1000)
    """Record this many steps with torch.profiler, from the first capture on, on rank 0: the
    operators' CPU (and CUDA) times, kept with the run as debug/trace.json (open it in Perfetto or
    chrome://tracing); 0: none."""
