"""The debugger's rules: small pure functions over what was captured, each returning the
evidence when its pathology shows (None when it does not); the fix each suggests is beside it.
Step rules judge one capture (and the captures before it); epoch rules the epochs' metrics."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raylens.trainer.debug.capture import Snapshot
from raylens.trainer.debug.settings import (
    ClassImbalance,
    CpuBottleneck,
    DeadRelu,
    ExplodingTensor,
    GrowingMemory,
    IoBottleneck,
    LoadImbalance,
    LossNotDecreasing,
    LowGpuUtilization,
    Overfit,
    Overtraining,
    PoorWeightInitialization,
    SaturatedActivation,
    SlowInitialization,
    StepSize,
    StepTimeOutlier,
    UnchangedTensor,
    UpdateRatio,
    VanishingGradient,
)


@dataclass(frozen=True)
class Finding:
    """A rule that fired: where, on what evidence, what to try, and what it did."""

    rule: str
    step: int
    epoch: int
    rank: int
    evidence: str
    fix: str
    action: str

    def said(self) -> str:
        where = f"step {self.step} (epoch {self.epoch + 1})" + (f", rank {self.rank}" if self.rank else "")
        return f"{self.rule} at {where}: {self.evidence}. {self.fix}"


def vanishing_gradient(snap: Snapshot, earlier: Sequence[Snapshot], rule: VanishingGradient) -> str | None:
    norms = {s.layer: s.grad_norm for s in snap.layers if s.kind == "weights" and math.isfinite(s.grad_norm)}
    if len(norms) < 2:
        return None
    largest = max(norms.values())
    faint = {layer: norm for layer, norm in norms.items() if norm < rule.ratio * largest}
    if not faint or largest == 0:
        return None
    layer, norm = min(faint.items(), key=lambda item: item[1])
    return (
        f"the gradient norm of {len(faint)} layer(s) is below {rule.ratio:g} x the largest "
        f"({largest:.3g}); smallest: {layer} {norm:.3g}"
    )


def exploding_tensor(snap: Snapshot, earlier: Sequence[Snapshot], rule: ExplodingTensor) -> str | None:
    broken = [s for s in snap.layers if s.nonfinite]
    if broken:
        return f"NaN or Inf in the gradients or weights of {', '.join(s.layer for s in broken[:5])}"
    huge = [s for s in snap.layers if s.kind == "weights" and s.grad_norm > rule.limit]
    if huge:
        worst = max(huge, key=lambda s: s.grad_norm)
        return f"the gradient norm of {worst.layer} is {worst.grad_norm:.3g}, above {rule.limit:g}"
    return None


def saturated_activation(
    snap: Snapshot, earlier: Sequence[Snapshot], rule: SaturatedActivation
) -> str | None:
    saturated = [s for s in snap.layers if s.saturated > rule.fraction]
    if not saturated:
        return None
    worst = max(saturated, key=lambda s: s.saturated)
    return (
        f"{worst.saturated:.0%} of {worst.layer}'s {worst.kind} outputs are saturated "
        f"(limit {rule.fraction:.0%})"
    )


def dead_relu(snap: Snapshot, earlier: Sequence[Snapshot], rule: DeadRelu) -> str | None:
    dead = [s for s in snap.layers if s.zero > rule.fraction]
    if not dead:
        return None
    worst = max(dead, key=lambda s: s.zero)
    return f"{worst.zero:.0%} of {worst.layer}'s ReLU outputs are zero (limit {rule.fraction:.0%})"


def update_ratio(snap: Snapshot, earlier: Sequence[Snapshot], rule: UpdateRatio) -> str | None:
    ratios = [s.update_ratio for s in snap.layers if s.kind == "weights" and math.isfinite(s.update_ratio)]
    if not ratios:
        return None
    median = statistics.median(ratios)
    if rule.low <= median <= rule.high:
        return None
    side = "below" if median < rule.low else "above"
    bound = rule.low if median < rule.low else rule.high
    return f"the median layer's update/weight ratio is {median:.3g}, {side} {bound:g}"


def step_size(snap: Snapshot, earlier: Sequence[Snapshot], rule: StepSize) -> str | None:
    recent = [*earlier, snap][-rule.captures :]
    alphas = [s.alpha for s in recent if math.isfinite(s.alpha)]
    if len(recent) < rule.captures or len(alphas) < rule.captures:
        return None
    median = statistics.median(alphas)
    too_low = rule.low is not None and median < rule.low
    if median <= rule.high and not too_low:
        return None
    noise = statistics.median(s.gradient_noise for s in recent)
    said = (
        "the steps overshoot the minimum along their direction"
        if median > rule.high
        else "the steps cover a sliver of the way to the minimum along their direction"
    )
    side, bound = ("above", rule.high) if median > rule.high else ("below", rule.low)
    return (
        f"the step size alpha's median over the last {rule.captures} captures is {median:.3g}, "
        f"{side} {bound:g}: {said} (gradient noise {noise:.3g})"
    )


def unchanged_tensor(snap: Snapshot, earlier: Sequence[Snapshot], rule: UnchangedTensor) -> str | None:
    weights = [s for s in snap.layers if s.kind == "weights" and math.isfinite(s.update_ratio)]
    zero = [s.layer for s in weights if s.weight_norm == 0]
    if zero:
        return f"the weights of {', '.join(zero[:5])} are all zero"
    still = [s.layer for s in weights if s.update_ratio == 0]
    if still:
        return f"the optimizer step left {', '.join(still[:5])} unchanged"
    return None


def io_bottleneck(snap: Snapshot, earlier: Sequence[Snapshot], rule: IoBottleneck) -> str | None:
    times = snap.times
    if times is None or times.total <= 0:
        return None
    share = times.data / times.total
    if share <= rule.share:
        return None
    return f"waiting for data took {share:.0%} of the step time over {times.batches} batches"


def load_imbalance(snap: Snapshot, earlier: Sequence[Snapshot], rule: LoadImbalance) -> str | None:
    busy = snap.ranks_busy
    # Judged once (rank 0 knows every rank's), past the first capture (its warm-up varies).
    if snap.rank != 0 or not earlier or len(busy) < 2 or min(busy) <= 0:
        return None
    slowest = max(range(len(busy)), key=busy.__getitem__)
    quickest = min(range(len(busy)), key=busy.__getitem__)
    if busy[slowest] <= rule.factor * busy[quickest] or busy[slowest] - busy[quickest] < rule.min_ms / 1000:
        return None
    return (
        f"rank {slowest} spends {1000 * busy[slowest]:.3g} ms a batch outside backward (data, forward, "
        f"optimizer step), {busy[slowest] / busy[quickest]:.1f} x rank {quickest}'s "
        f"{1000 * busy[quickest]:.3g} ms"
    )


def slow_initialization(snap: Snapshot, earlier: Sequence[Snapshot], rule: SlowInitialization) -> str | None:
    if earlier or not snap.started_s > rule.seconds:
        return None
    return (
        f"the worker took {snap.started_s:.0f} s from its start to its first step (limit {rule.seconds:g} s)"
    )


def cpu_bottleneck(snap: Snapshot, earlier: Sequence[Snapshot], rule: CpuBottleneck) -> str | None:
    if not (snap.cpu_util > rule.cpu and snap.gpu_util < rule.gpu):  # NaN (no GPU): never
        return None
    return f"the process kept its CPUs {snap.cpu_util:.0%} busy while the GPU was {snap.gpu_util:.0%} busy"


def low_gpu_utilization(snap: Snapshot, earlier: Sequence[Snapshot], rule: LowGpuUtilization) -> str | None:
    recent = [s.gpu_util for s in (*earlier, snap)][-rule.captures :]
    if len(recent) < rule.captures or not all(u < rule.gpu for u in recent):  # NaN: never
        return None
    return (
        f"the GPU was under {rule.gpu:.0%} busy at each of the last {rule.captures} captures "
        f"({recent[-1]:.0%} now)"
    )


def step_time_outlier(snap: Snapshot, earlier: Sequence[Snapshot], rule: StepTimeOutlier) -> str | None:
    times = snap.times
    # From the second capture on: the first window holds the run's warm-up (first allocations).
    if not earlier or times is None or times.batches < 5 or times.median <= 0:
        return None
    if times.slowest <= rule.factor * times.median:
        return None
    return (
        f"a batch took {times.slowest:.3g} s, {times.slowest / times.median:.0f} x the median "
        f"{times.median:.3g} s"
    )


def growing_memory(snap: Snapshot, earlier: Sequence[Snapshot], rule: GrowingMemory) -> str | None:
    series = [s.rss_mb for s in (*earlier, snap)][-(rule.captures + 1) :]
    if len(series) <= rule.captures:
        return None
    rising = all(b > a for a, b in itertools.pairwise(series))
    grew = series[-1] - series[0]
    if not rising or grew <= rule.mb:
        return None
    return (
        f"memory grew at each of the last {rule.captures} captures, by {grew:.0f} MiB in all "
        f"(to {series[-1]:.0f} MiB)"
    )


def _valid_best(epochs: Sequence[dict[str, float]], patience: int) -> tuple[list[float], int, int] | None:
    """valid_loss of every epoch, its best epoch and the epochs since, once more than
    ``patience`` finite epochs are in."""
    valid = [m.get("valid_loss", math.nan) for m in epochs]
    if len(valid) <= patience or not all(map(math.isfinite, valid)):
        return None
    best = min(range(len(valid)), key=valid.__getitem__)
    return valid, best, len(valid) - 1 - best


def overfit(epochs: Sequence[dict[str, float]], rule: Overfit) -> str | None:
    found = _valid_best(epochs, rule.patience)
    train = [m.get("train_loss", math.nan) for m in epochs]
    if found is None or not all(map(math.isfinite, train)):
        return None
    valid, best, since = found
    if since < rule.patience or not train[-1] < train[best]:
        return None
    return (
        f"valid_loss has not improved on {valid[best]:.4g} (epoch {best + 1}) for {since} epochs while "
        f"train_loss fell from {train[best]:.4g} to {train[-1]:.4g}"
    )


def overtraining(epochs: Sequence[dict[str, float]], rule: Overtraining) -> str | None:
    found = _valid_best(epochs, rule.patience)
    if found is None or found[2] < rule.patience:
        return None
    valid, best, since = found
    return f"valid_loss has not improved on {valid[best]:.4g} (epoch {best + 1}) for {since} epochs"


def class_imbalance(counts: Mapping[str, int], rule: ClassImbalance) -> str | None:
    """Judged once, on the training rows' classes (``counts``: rows per class label)."""
    if len(counts) < 2:
        return None
    rare, common = min(counts, key=counts.__getitem__), max(counts, key=counts.__getitem__)
    if counts[rare] >= rule.ratio * counts[common]:
        return None
    return (
        f"class {rare} has {counts[rare]} training rows, {counts[rare] / counts[common]:.1%} of class "
        f"{common}'s {counts[common]}"
    )


def poor_weight_initialization(scales: Mapping[str, float], rule: PoorWeightInitialization) -> str | None:
    """Judged once, before the first step, on each layer's weight std x sqrt(fan-in)."""
    off = {layer: scale for layer, scale in scales.items() if not rule.low <= scale <= rule.high}
    if not off:
        return None
    layer, scale = max(off.items(), key=lambda item: abs(math.log(max(item[1], 1e-30))))
    return (
        f"{len(off)} layer(s) start with weights of std x sqrt(fan-in) outside [{rule.low:g}, "
        f"{rule.high:g}]; furthest: {layer} {scale:.3g}"
    )


def loss_not_decreasing(epochs: Sequence[dict[str, float]], rule: LossNotDecreasing) -> str | None:
    train = [m.get("train_loss", math.nan) for m in epochs]
    if len(train) <= rule.patience or not all(map(math.isfinite, train)):
        return None
    best_before = min(train[: -rule.patience])
    recent = min(train[-rule.patience :])
    if recent < best_before * (1 - rule.min_delta):
        return None
    return (
        f"train_loss has not fallen below {best_before:.4g} for {rule.patience} epochs "
        f"(lowest since: {recent:.4g})"
    )


StepRule = Callable[[Snapshot, Sequence[Snapshot], Any], "str | None"]
EpochRule = Callable[[Sequence[dict[str, float]], Any], "str | None"]

STEP_RULES: dict[str, tuple[StepRule, str]] = {
    "vanishing_gradient": (
        vanishing_gradient,
        "Use ReLU-family activations, normalization layers or residual connections, or a smaller depth",
    ),
    "exploding_tensor": (
        exploding_tensor,
        "Lower train.optimizer.lr, set train.clip_grad_norm (e.g. 1.0) or a warmup",
    ),
    "saturated_activation": (
        saturated_activation,
        "Initialize weights smaller (Xavier for sigmoid/tanh), normalize the inputs, or use ReLU",
    ),
    "dead_relu": (
        dead_relu,
        "Lower the learning rate, check the biases' initialization, or use LeakyReLU/GELU",
    ),
    "update_ratio": (
        update_ratio,
        "Tune train.optimizer.lr: about 1e-3 of the weights' norm per step is healthy",
    ),
    "step_size": (
        step_size,
        "Lower train.optimizer.lr when alpha is above 1, raise it when alpha is near -1; where the "
        "gradient noise is far above 1, raise train.batch_size first",
    ),
    "unchanged_tensor": (
        unchanged_tensor,
        "Check that the layer is trainable and in the optimizer, and its initialization",
    ),
    "io_bottleneck": (
        io_bottleneck,
        "Make the data path faster: preprocess into the feature store, or give workers more CPUs",
    ),
    "load_imbalance": (
        load_imbalance,
        "Give every worker the same resources and rows; look for a slow node, disk or data shard",
    ),
    "slow_initialization": (
        slow_initialization,
        "Look at what runs before training: model construction, checkpoint restore, data loading",
    ),
    "cpu_bottleneck": (
        cpu_bottleneck,
        "Move data preparation into the feature pipeline, raise train.batch_size, or give workers "
        "more CPUs (train.scaling.cpus_per_worker)",
    ),
    "low_gpu_utilization": (
        low_gpu_utilization,
        "Raise train.batch_size, use bf16 (train.precision), or give the GPU a smaller share",
    ),
    "step_time_outlier": (
        step_time_outlier,
        "Look for stalls outside training: garbage collection, a slow disk, another process",
    ),
    "growing_memory": (
        growing_memory,
        "Something keeps tensors alive across steps: detach values you keep (loss.item(), .detach())",
    ),
}
"""Rules judging each capture, with the fix each suggests."""

EPOCH_RULES: dict[str, tuple[EpochRule, str]] = {
    "overfit": (
        overfit,
        "Regularize (weight_decay, dropout), add data, or stop earlier (train.early_stopping)",
    ),
    "overtraining": (
        overtraining,
        "Stop earlier (train.early_stopping), or lower the learning rate late (train.schedule)",
    ),
    "loss_not_decreasing": (
        loss_not_decreasing,
        "Raise train.optimizer.lr, check the labels and the loss, or the model's capacity",
    ),
}
"""Rules judging the epochs' metrics, with the fix each suggests."""

INITIALIZATION_FIX = (
    "Use PyTorch's default initialization, or Xavier (sigmoid, tanh) / He (ReLU) for custom layers"
)
CLASS_IMBALANCE_FIX = 'Weigh the classes in the loss (train.class_weights: "balanced"), or resample the data'
