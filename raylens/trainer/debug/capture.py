"""What the debugger captures, with PyTorch's own hooks, only on the steps it captures: each
layer's gradient and weight norms and update/weight ratio (optimizer step hooks), activation
statistics (forward hooks on sigmoid, tanh and ReLU modules), NaN/Inf counts, and from the step
after a captured one two gradient signals after Cockpit (Schneider et al., NeurIPS 2021): the step
size alpha and the gradient's noise; and on every step, from the loop's heartbeat, where the time
went (data wait, forward, backward, optimizer), with DDP's gradient all-reduce timed by a comm
hook."""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ACTIVATIONS: dict[type[nn.Module], str] = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu"}


@dataclass(frozen=True)
class LayerStats:
    """One module at one captured step: a layer with weights, or an activation module."""

    layer: str
    kind: str
    """weights, sigmoid, tanh or relu."""
    grad_norm: float = math.nan
    weight_norm: float = math.nan
    update_ratio: float = math.nan
    """Norm of the optimizer step's change over the weights' norm."""
    nonfinite: int = 0
    """1 when the gradients or weights hold a NaN or an Inf (their norm is not finite)."""
    saturated: float = math.nan
    """sigmoid, tanh: share of outputs within 1 % of their bounds."""
    zero: float = math.nan
    """relu: share of outputs that are zero."""


@dataclass(frozen=True)
class StepTimes:
    """Where the time of the steps since the last capture went, in seconds summed over batches."""

    batches: int
    data: float
    forward: float
    backward: float
    optimizer: float
    """The optimizer step and the loop's bookkeeping until the next batch."""
    slowest: float
    """The slowest batch."""
    median: float
    """The median batch."""
    communication: float = math.nan
    """DDP's gradient all-reduce: from the first bucket's launch to the last one's completion, per
    batch, summed (it overlaps backward, and is part of it); NaN without DDP."""

    @property
    def total(self) -> float:
        return self.data + self.forward + self.backward + self.optimizer


@dataclass(frozen=True)
class Snapshot:
    """The run's state at one captured step, on one rank."""

    step: int
    epoch: int
    rank: int
    layers: tuple[LayerStats, ...]
    times: StepTimes | None
    rss_mb: float
    cpu_util: float = math.nan
    """The process's CPU time over the window's wall time, per CPU it may use (0 to 1)."""
    gpu_util: float = math.nan
    """The GPU's utilization during the window as NVML reports it (0 to 1); NaN without a GPU or
    NVML."""
    gpu_mb: float = math.nan
    """The most GPU memory the process's tensors held during the window; NaN without a GPU."""
    started_s: float = math.nan
    """Seconds from the worker's start to its first step (the first capture only)."""
    ranks_busy: tuple[float, ...] = ()
    """Every rank's seconds per batch outside backward (loading data, forward, the optimizer
    step) over the window, by rank (empty on one worker)."""
    alpha: float = math.nan
    """Cockpit's step size of the captured step: where it ended on the parabola the loss draws
    along its direction, from the directional derivatives at its start and end (the next batch's
    gradient): -1 where it began (too small a step), 0 at the parabola's minimum, 1 at the same
    loss on the far side, above 1 uphill (too large). NaN where train.debug.every is 1."""
    gradient_noise: float = math.nan
    """The minibatch gradient's noise over its signal, from two successive batches' gradients
    g0, g1: |g0 - g1|^2 / 2 over g0.g1 (McCandlish et al.'s noise scale over the batch size): above
    1 the noise dominates (a larger batch or a lower learning rate helps), far below 1 a smaller
    batch would do as well. An upper estimate: the step between the two batches adds its own
    change of the gradient; inf where the gradient turned against itself."""


class CommClock:
    """Times DDP's gradient all-reduce: registered as the model's comm hook, it runs PyTorch's
    default hook (``allreduce_hook``) and reads the clock as each bucket is launched and done."""

    def __init__(self) -> None:
        self.total = 0.0
        self._first, self._last = math.inf, -math.inf

    def hook(self, state: Any, bucket: Any) -> Any:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self._first = min(self._first, time.perf_counter())

        def done(future: Any) -> Any:
            self._last = max(self._last, time.perf_counter())
            return future.value()

        return allreduce_hook(state, bucket).then(done)

    def end_batch(self) -> None:
        """The batch's buckets are all done (DDP waits for them before backward returns)."""
        if self._last > self._first:
            self.total += self._last - self._first
        self._first, self._last = math.inf, -math.inf

    def window(self) -> float:
        total, self.total = self.total, 0.0
        return total


class PhaseClock:
    """Times each batch's phases from the loop's heartbeat (``raylens.trainer.loop.Heartbeat``):
    a clock read per phase, nothing else, so it runs on every step."""

    def __init__(self, comm: CommClock | None = None) -> None:
        self.comm = comm
        self.sums = [0.0, 0.0, 0.0, 0.0]
        self.batches: list[float] = []
        self.phase: int | None = None
        self.since = self.batch_began = 0.0

    def beat(self, epoch: int, step: int, phase: int) -> None:
        now = time.perf_counter()
        if self.phase is not None:
            self.sums[self.phase] += now - self.since
            if phase == 0:
                self.batches.append(now - self.batch_began)
        if phase == 3 and self.comm is not None:
            # Backward has returned, so its all-reduce is done: the batch's span is counted in the
            # same window as its backward time.
            self.comm.end_batch()
        if phase == 0:
            self.batch_began = now
        self.phase, self.since = phase, now

    def pause(self) -> None:
        """Validation follows: the batch ends here and the pause is not timed."""
        if self.phase is not None:
            now = time.perf_counter()
            self.sums[self.phase] += now - self.since
            self.batches.append(now - self.batch_began)
        self.phase = None

    def window(self) -> StepTimes | None:
        """The times since the last call, and a new window."""
        if not self.batches:
            return None
        ordered = sorted(self.batches)
        data, forward, backward, optimizer = self.sums
        times = StepTimes(
            len(ordered),
            data,
            forward,
            backward,
            optimizer,
            ordered[-1],
            ordered[len(ordered) // 2],
            communication=self.comm.window() if self.comm is not None else math.nan,
        )
        self.sums, self.batches = [0.0, 0.0, 0.0, 0.0], []
        return times


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's local part (a DTensor under FSDP): each rank judges its own shard."""
    local = getattr(tensor, "to_local", None)
    return local() if callable(local) else tensor


def _norms(tensors: list[torch.Tensor]) -> list[float]:
    """Each tensor's 2-norm, computed together and read back once."""
    if not tensors:
        return []
    return torch.stack(torch._foreach_norm(tensors)).tolist()


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' values as one new vector: float64 where one of them is, else float32."""
    if not tensors:
        return torch.zeros(0)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    with torch.no_grad():  # one context, not a detach per tensor
        flat = [_plain(t).reshape(-1) for t in tensors]
        return torch.cat([t if t.dtype == dtype else t.to(dtype) for t in flat])


def _segment_norms(flat: torch.Tensor, sizes: Sequence[int]) -> list[float]:
    """The 2-norm of each consecutive segment of ``flat`` of the given sizes."""
    return _norms(list(torch.split(flat, list(sizes)))) if sizes else []


def _name(name: str) -> str:
    """The module's name as the user wrote the model (without DDP's or FSDP's wrapper prefixes)."""
    for prefix in ("module.", "_fsdp_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def initial_scales(model: nn.Module) -> dict[str, float]:
    """Each Linear or convolution layer's weight std x sqrt(fan-in): about 0.58 under PyTorch's
    default initialization, 1.41 under He's, whatever the layer's width."""
    scales = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            weight = _plain(module.weight).detach().float()
            if weight.numel() > 1:
                fan_in = weight[0].numel()
                scales[_name(name)] = float(weight.std()) * math.sqrt(fan_in)
    return scales


def check_layers(model: nn.Module, layers: Sequence[str], key: str = "train.debug.layers") -> None:
    """Every layer ``key`` names (``train.debug.layers``, ``train.debug.tensors``) is one of
    ``model``'s modules."""
    from raylens.errors import UserError

    names = [_name(name) for name, _ in model.named_modules() if name]
    for layer in layers:
        if layer not in names:
            raise UserError(f"{key}: the model has no layer '{layer}'; its layers: {', '.join(names)}")


def _chosen(name: str, layers: Sequence[str]) -> bool:
    return not layers or any(name == layer or name.startswith(layer + ".") for layer in layers)


@dataclass
class Capture:
    """Hooks armed for one optimizer step, removed once it is captured: between captures the
    model and optimizer run as if nothing watched them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    layers: Sequence[str] = ()
    activations: bool = True
    keep: Sequence[str] = ()
    """Layers whose full weights and gradients are kept at each capture (``train.debug.tensors``)."""
    captured: dict[str, LayerStats] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """The last capture's kept tensors: ``<layer>.<param>`` (weights after the step) and
    ``<layer>.<param>.grad``."""
    _handles: list[Any] = field(default_factory=list)
    _before: torch.Tensor | None = None
    _grads: torch.Tensor | None = None
    """The captured step's gradients (of the parameters that had one, flattened into one vector),
    for the next step's signals."""
    _direction: torch.Tensor | None = None
    """The captured step's change of those parameters, flattened alike."""
    _follow: Any = None
    """The hook reading the signals at the step after the captured one."""
    sums: tuple[float, ...] = ()
    """The signals' sums over this rank's parameters, once read: g0.d, g1.d, g0.g1, |g0 - g1|^2
    (g0, g1: the captured and the next step's gradients, d: the captured step)."""

    def __post_init__(self) -> None:
        self.weighted = {
            _name(name): list(module.parameters(recurse=False))
            for name, module in self.model.named_modules()
            if _chosen(_name(name), self.layers)
            and any(p.requires_grad for p in module.parameters(recurse=False))
        }
        self.activation_modules = {
            _name(name): (module, ACTIVATIONS[type(module)])
            for name, module in self.model.named_modules()
            if type(module) in ACTIVATIONS and _chosen(_name(name), self.layers)
        }

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        """Capture the next optimizer step (and the training forward before it)."""
        if self.armed:
            return
        self._forget_signals()
        self.captured = {}
        self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
        if self.activations:
            for name, (module, kind) in self.activation_modules.items():
                self._handles.append(module.register_forward_hook(self._activation_hook(name, kind)))

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._before = [], None

    def _kept_params(self) -> list[tuple[str, nn.Parameter]]:
        """``<layer>.<param>`` and the parameter, of the layers ``keep`` names."""
        if not self.keep:
            return []
        return [
            (f"{_name(name)}.{param_name}", p)
            for name, module in self.model.named_modules()
            if _chosen(_name(name), self.keep)
            for param_name, p in module.named_parameters(recurse=False)
        ]

    def _activation_hook(self, name: str, kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not module.training or name in self.captured or not isinstance(output, torch.Tensor):
                return  # validation, or a later forward of the same step (accumulated batches)
            y = _plain(output).detach()
            count = max(1, y.numel())
            # Counted as sums of signs (one float kernel each, several times quicker on a CPU than
            # reducing a boolean mask): a ReLU's output is positive or zero; an output is
            # saturated where it lies within 0.01 of a bound (tanh: |y| >= 0.99; sigmoid:
            # |y - 0.5| >= 0.49).
            if kind == "relu":
                positive = float(torch.sign(y).sum(dtype=torch.float32))
                self.captured[name] = LayerStats(name, kind, zero=1 - positive / count)
                return
            middle, half = (0.0, 0.99) if kind == "tanh" else (0.5, 0.49)
            signs = float(torch.sign((y - middle).abs() - half).sum(dtype=torch.float32))
            self.captured[name] = LayerStats(name, kind, saturated=(signs + count) / (2 * count))

        return hook

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # The gradients are whole here (accumulated, and all-reduced under DDP). Norms are taken
        # of every tensor at once (torch._foreach_norm) and read back once: a capture costs a
        # few kernels, not a few per layer.
        params = [(name, _plain(p).detach(), p.grad) for name, ps in self.weighted.items() for p in ps]
        self.tensors = {}
        for key, p in self._kept_params():
            if p.grad is not None:
                self.tensors[f"{key}.grad"] = _plain(p.grad).detach().cpu().clone()
        # Flat copies: one kernel each, and the norms of their segments in one more.
        self._before = _flat([p for _, p, _ in params])
        grads = [(name, _plain(g).detach()) for name, _, g in params if g is not None]
        self._grads = _flat([g for _, g in grads])
        norms = _segment_norms(self._grads, [g.numel() for _, g in grads])
        squares: dict[str, float] = {}
        for (name, _), norm in zip(grads, norms, strict=True):
            squares[name] = squares.get(name, 0.0) + norm * norm
        for name in self.weighted:
            grad = math.sqrt(squares[name]) if name in squares else math.nan
            self.captured[name] = LayerStats(
                name, "weights", grad_norm=grad, nonfinite=int(not math.isfinite(grad))
            )

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        before = self._before
        for key, p in self._kept_params():
            self.tensors[key] = _plain(p).detach().cpu().clone()
        params = [(name, _plain(p).detach()) for name, ps in self.weighted.items() for p in ps]
        after = _flat([p for _, p in params])
        if before is not None and before.numel() == after.numel():
            sizes = [p.numel() for _, p in params]
            step = after - before
            weights, changes = _segment_norms(after, sizes), _segment_norms(step, sizes)
            graded = [p.grad is not None for ps in self.weighted.values() for p in ps]
            self._direction = (
                step
                if all(graded)
                else _flat([d for d, has in zip(torch.split(step, sizes), graded, strict=True) if has])
            )
            if self._grads is not None and self._direction.numel() == self._grads.numel():
                self._follow = optimizer.register_step_pre_hook(self._read_signals)
            weight_sq: dict[str, float] = {}
            change_sq: dict[str, float] = {}
            for (name, _), weight, change in zip(params, weights, changes, strict=True):
                weight_sq[name] = weight_sq.get(name, 0.0) + weight * weight
                change_sq[name] = change_sq.get(name, 0.0) + change * change
            for name, stats in list(self.captured.items()):
                if stats.kind != "weights" or name not in weight_sq:
                    continue
                weight, change = math.sqrt(weight_sq[name]), math.sqrt(change_sq[name])
                self.captured[name] = LayerStats(
                    name,
                    "weights",
                    grad_norm=stats.grad_norm,
                    weight_norm=weight,
                    update_ratio=change / weight if weight > 0 else (0.0 if change == 0 else math.inf),
                    nonfinite=stats.nonfinite + int(not math.isfinite(weight)),
                )
        self.disarm()

    def _read_signals(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # The next step's gradients, at the weights the captured step left: three dot products
        # and a norm of flat vectors, read back at once.
        params = [_plain(p) for ps in self.weighted.values() for p in ps]
        g0, d = self._grads, self._direction
        self._forget_signals()
        g1 = _flat([p.grad.detach() for p in params if p.grad is not None])
        if g0 is None or d is None or g1.numel() != g0.numel():
            return
        # The difference's own norm, not |g0|^2 + |g1|^2 - 2 g0.g1: close gradients would cancel.
        d, g1 = d.to(g0.dtype), g1.to(g0.dtype)
        sums = torch.stack([g0.dot(d), g1.dot(d), g0.dot(g1), (g0 - g1).square().sum()])
        self.sums = tuple(sums.tolist())

    def _forget_signals(self) -> None:
        if self._follow is not None:
            self._follow.remove()
        self._follow, self._grads, self._direction = None, None, None

    def signals(self) -> tuple[float, ...]:
        """The last capture's signal sums (see ``sums``; empty when they were not read: the
        next step had not come, or ``train.debug.every`` is 1), and a new reading."""
        self._forget_signals()
        sums, self.sums = self.sums, ()
        return sums

    def taken(self) -> tuple[LayerStats, ...]:
        """The last armed step's statistics (empty while it has not been captured, or where this
        rank holds none of the layers chosen)."""
        if self.armed:
            self.disarm()
            self.captured = {}
        taken, self.captured = tuple(self.captured.values()), {}
        return taken


def step_signals(sums: Sequence[float]) -> tuple[float, float]:
    """Cockpit's alpha and the gradient noise (``Snapshot.alpha``, ``Snapshot.gradient_noise``)
    from the signal sums over every parameter (``Capture.sums``, added up over the ranks that
    hold different parts of the model; ranks holding the same parts scale every sum alike, which
    the ratios do not see)."""
    if len(sums) != 4:
        return math.nan, math.nan
    g0_d, g1_d, g0_g1, apart = sums
    # Along d the loss is a parabola with slopes g0.d at the step's start and g1.d at its end:
    # its minimum is at -g0.d / (g1.d - g0.d) of the step, which Cockpit's alpha rescales so that
    # the start is -1 and the minimum 0: alpha = -g1.d / g0.d.
    alpha = -g1_d / g0_d if g0_d < 0 else math.nan
    noise = 0.5 * apart
    gradient_noise = noise / g0_g1 if g0_g1 > 0 else (math.inf if noise > 0 else math.nan)
    return alpha, gradient_noise


class Utilization:
    """The process's CPU and the GPU's use between two readings: CPU time from ``process_time``,
    the GPU's from NVML through ``torch.cuda`` (when both are there)."""

    def __init__(self) -> None:
        self.cpus = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        )
        self.gpu = torch.cuda.is_available()
        self._since = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()  # every thread's CPU time, finely

    def window(self) -> tuple[float, float, float]:
        """CPU utilization, GPU utilization and peak GPU memory (MiB) since the last call."""
        now = self._now()
        wall, cpu = now[0] - self._since[0], now[1] - self._since[1]
        self._since = now
        cpu_util = cpu / wall / self.cpus if wall > 0 else math.nan
        gpu_util = gpu_mb = math.nan
        if self.gpu:
            gpu_mb = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            try:
                gpu_util = torch.cuda.utilization() / 100
            except Exception:  # no NVML (pynvml) here: the utilization is unknown, not zero
                gpu_util = math.nan
        return cpu_util, gpu_util, gpu_mb


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """This process's resident memory (Linux: now; elsewhere: its peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
