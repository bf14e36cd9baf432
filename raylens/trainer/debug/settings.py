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
    model_config = ConfigDict(extra="forbid")

    action: RuleAction = "warn"


class VanishingGradient(_Rule):
    """A layer's gradient norm is below ``ratio`` x the largest layer's: the layers before it
    barely learn (deep sigmoid or tanh stacks without normalization)."""

    ratio: float = Field(1e-4, gt=0, lt=1)


class ExplodingTensor(_Rule):
    """A gradient or weight holds NaN or Inf, or a layer's gradient norm exceeds ``limit``."""

    limit: float = Field(1e4, gt=0)


class SaturatedActivation(_Rule):
    """More than ``fraction`` of a sigmoid or tanh layer's outputs are saturated (within 1 % of
    their bounds), where their gradient vanishes."""

    fraction: float = Field(0.5, gt=0, le=1)


class DeadRelu(_Rule):
    """More than ``fraction`` of a ReLU layer's outputs are zero: its units no longer learn."""

    fraction: float = Field(0.9, gt=0, le=1)


class UpdateRatio(_Rule):
    """The median layer's update/weight norm ratio of one optimizer step is outside
    [``low``, ``high``] (about 1e-3 is healthy): the learning rate is too low or too high."""

    action: RuleAction = "record"
    low: float = Field(1e-6, gt=0)
    high: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> UpdateRatio:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        return self


class UnchangedTensor(_Rule):
    """A trainable layer's weights are all zero, or its optimizer step left them unchanged."""


class Overfit(_Rule):
    """valid_loss has not improved on its best for ``patience`` epochs while train_loss kept
    falling."""

    patience: int = Field(3, ge=1)


class LossNotDecreasing(_Rule):
    """train_loss has not fallen below its best by ``min_delta`` (relative) for ``patience``
    epochs."""

    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.001, ge=0, lt=1)


class IoBottleneck(_Rule):
    """Waiting for data takes more than ``share`` of the step time."""

    share: float = Field(0.5, gt=0, lt=1)


class StepTimeOutlier(_Rule):
    """A step took more than ``factor`` x the median step time of its capture window."""

    action: RuleAction = "record"
    factor: float = Field(10.0, gt=1)


class GrowingMemory(_Rule):
    """The process's memory grew at each of the last ``captures`` captures, by more than ``mb``
    MiB in all: something keeps tensors alive across steps."""

    captures: int = Field(4, ge=2)
    mb: float = Field(256.0, gt=0)


def _as_settings(value: Any) -> Any:
    if isinstance(value, str):
        return {"action": value}
    if value is None or value is False:
        return {"action": "off"}
    return value


class RulesConfig(BaseModel):
    """Each rule's action and thresholds, over its defaults. A rule given as an action alone
    (overfit: stop) keeps its default thresholds; off turns it off."""

    model_config = ConfigDict(extra="forbid")

    vanishing_gradient: VanishingGradient = Field(default_factory=VanishingGradient)
    exploding_tensor: ExplodingTensor = Field(default_factory=ExplodingTensor)
    saturated_activation: SaturatedActivation = Field(default_factory=SaturatedActivation)
    dead_relu: DeadRelu = Field(default_factory=DeadRelu)
    update_ratio: UpdateRatio = Field(default_factory=UpdateRatio)
    unchanged_tensor: UnchangedTensor = Field(default_factory=UnchangedTensor)
    overfit: Overfit = Field(default_factory=Overfit)
    loss_not_decreasing: LossNotDecreasing = Field(default_factory=LossNotDecreasing)
    io_bottleneck: IoBottleneck = Field(default_factory=IoBottleneck)
    step_time_outlier: StepTimeOutlier = Field(default_factory=StepTimeOutlier)
    growing_memory: GrowingMemory = Field(default_factory=GrowingMemory)

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

    model_config = ConfigDict(extra="forbid")

    every: int = Field(50, ge=1)
    """Optimizer steps between two captures (per-layer gradient and weight norms, update ratios,
    activation statistics, step-time breakdown, memory); a capture's rules judge it at once."""
    layers: list[str] = Field(default_factory=list)
    """Capture only these modules (names as in model.named_modules(), their children included);
    empty: every layer with weights and every activation module."""
    rules: RulesConfig = Field(default_factory=RulesConfig)
    """Each rule's action (off, record, warn, stop, fail) and thresholds."""
