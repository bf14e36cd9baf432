"""The debugger: a ``loop.Monitor`` that captures the run's state every ``debug.every`` steps,
judges each capture and each epoch with the spec's rules, and acts on what they find (record,
warn, stop, fail). Every rank runs one; their stop and fail decisions are agreed by ``fit``."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.optim import Optimizer

from raylens.trainer.debug.capture import (
    Capture,
    CommClock,
    PhaseClock,
    Snapshot,
    StepTimes,
    Utilization,
    initial_scales,
    rss_mb,
    step_signals,
)
from raylens.trainer.debug.rules import (
    CLASS_IMBALANCE_FIX,
    EPOCH_RULES,
    INITIALIZATION_FIX,
    STEP_RULES,
    Finding,
    class_imbalance,
    poor_weight_initialization,
)
from raylens.trainer.debug.settings import DebugConfig
from raylens.trainer.decisions import GO_ON, Action, Decision
from raylens.trainer.loop import StepView

logger = logging.getLogger("raylens.debug")

LAYERS_FILE, STEPS_FILE, FINDINGS_FILE = "debug/layers.parquet", "debug/steps.parquet", "debug/findings.json"
TRACE_FILE, TENSORS_FILE = "debug/trace.json", "debug/tensors.pt"
"""Where a run's capture and findings are kept: in its checkpoints, then as MLflow artifacts."""

Gather = Callable[[Any], list[Any]]
"""Every rank's value, in rank order (an all-gather); ``[value]`` on one worker."""

_ACTIVATION_RULES = ("saturated_activation", "dead_relu")


class Debugger:
    def __init__(
        self,
        config: DebugConfig,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        rank: int = 0,
        on_finding: Callable[[Finding], None] | None = None,
        gather: Gather = lambda value: [value],
        started: float | None = None,
    ) -> None:
        """``started``: when the worker started (``time.perf_counter()``); default: now."""
        self.every = config.every
        self.rules = config.rules.active()
        self.rank, self.gather = rank, gather
        self.on_finding = on_finding or (lambda finding: logger.warning("%s", finding.said()))
        activations = any(name in self.rules for name in _ACTIVATION_RULES)
        self.capture = Capture(
            model, optimizer, config.layers, activations=activations, keep=config.tensors if rank == 0 else ()
        )
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}
        """The kept layers' tensors by captured step (``train.debug.tensors``; rank 0)."""
        comm = None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            comm = CommClock()
            # A lambda: DDP checks a hook's annotations against its own types, and this module's
            # are strings (postponed evaluation).
            model.register_comm_hook(None, lambda state, bucket: comm.hook(state, bucket))
        self.clock = PhaseClock(comm)
        self.usage = Utilization()
        self.started = time.perf_counter() if started is None else started
        self.started_s = math.nan
        """Seconds from the worker's start to its first batch, once it has begun."""
        self.snapshots: list[Snapshot] = []
        self.epochs: list[dict[str, float]] = []
        self.findings: list[Finding] = []
        self._earlier: dict[str, list[dict[str, Any]]] = {LAYERS_FILE: [], STEPS_FILE: []}
        """Rows of the run before a resume (kept by rank 0, which writes the checkpoint)."""
        self._armed = False
        self._pending = GO_ON
        """A decision taken while reporting, given at the next step or epoch end."""
        self.profile_steps = config.profile_steps
        self._profiler: Any = None
        self._profiled = 0
        self.trace: bytes | None = None
        """rank 0's torch.profiler trace (Chrome trace JSON), once its steps are recorded."""
        self._armed_at = (0, 0)  # (step, epoch) of the step being captured
        self._epoch = 0

    # The loop's heartbeat: time every batch's phases.
    def beat(self, epoch: int, step: int, phase: int) -> None:
        if self.started_s != self.started_s and phase == 0:  # NaN: the first batch begins
            self.started_s = time.perf_counter() - self.started
            self.usage.window()  # utilization counts from the first step
        self.clock.beat(epoch, step, phase)
        if self._profiler is not None and phase == 0:
            self._profiled += 1
            if self._profiled > self.profile_steps:
                self._end_profile()

    def _start_profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities)
        self._profiler.__enter__()

    def _end_profile(self) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        profiler.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            profiler.export_chrome_trace(str(path))
            self.trace = path.read_bytes()

    def pause(self) -> None:
        self.clock.pause()

    def on_step(self, view: StepView) -> Decision:
        decision, self._pending = self._pending, GO_ON
        if self._armed:  # on every rank at the same steps: the gather below is a collective
            decision = _graver(decision, self._take())
        if self.profile_steps and self.trace is None and self._profiler is None and self.rank == 0:
            self._start_profile()
        self.capture.arm()
        self._armed, self._armed_at = True, (view.step + 1, view.epoch)
        return decision

    def _take(self) -> Decision:
        """The armed capture as a snapshot, judged by the step rules."""
        self._armed = False
        step, epoch = self._armed_at
        if self.capture.tensors:
            self.tensors[step], self.capture.tensors = self.capture.tensors, {}
        times = self.clock.window()
        cpu_util, gpu_util, gpu_mb = self.usage.window()
        # A rank's own work: a synchronous run's ranks wait for the slowest in backward's
        # all-reduce, so the time outside backward tells the ranks apart.
        busy = (times.total - times.backward) / times.batches if times is not None else 0.0
        gathered = self.gather((busy, self.capture.signals()))
        ranks_busy = tuple(b for b, _ in gathered)
        read = [s for _, s in gathered]
        alpha, gradient_noise = step_signals(
            [sum(column) for column in zip(*read, strict=True)] if all(read) else ()
        )
        snapshot = Snapshot(
            step,
            epoch,
            self.rank,
            self.capture.taken(),
            times,
            rss_mb(),
            cpu_util=cpu_util,
            gpu_util=gpu_util,
            gpu_mb=gpu_mb,
            started_s=self.started_s if not self.snapshots else math.nan,
            ranks_busy=ranks_busy if len(ranks_busy) > 1 else (),
            alpha=alpha,
            gradient_noise=gradient_noise,
        )
        earlier = list(self.snapshots)
        self.snapshots.append(snapshot)
        return self._act(
            [
                (name, judge(snapshot, earlier, self.rules[name]), fix)
                for name, (judge, fix) in STEP_RULES.items()
                if name in self.rules
            ],
            step,
            epoch,
        )

    def judge_start(self, class_counts: Mapping[str, int] | None) -> Decision:
        """Rules judged once, before the first step: the weights' initial scale, and (for a
        classification) the balance of the training rows' classes."""
        verdicts = []
        if "poor_weight_initialization" in self.rules:
            evidence = poor_weight_initialization(
                initial_scales(self.capture.model), self.rules["poor_weight_initialization"]
            )
            verdicts.append(("poor_weight_initialization", evidence, INITIALIZATION_FIX))
        if "class_imbalance" in self.rules and class_counts is not None and self.rank == 0:
            evidence = class_imbalance(class_counts, self.rules["class_imbalance"])
            verdicts.append(("class_imbalance", evidence, CLASS_IMBALANCE_FIX))
        decision = self._act(verdicts, 0, 0)
        # Agreed (a collective, on every rank): a pipeline's stages judge different layers.
        everyone = self.gather(decision.action)
        if decision.action is Action.CONTINUE and any(a is not Action.CONTINUE for a in everyone):
            return Decision(Action.FAIL, "another worker stopped the run")
        return decision

    def on_epoch(self, metrics: dict[str, float]) -> Decision:
        self.epochs.append(dict(metrics))
        epoch = int(metrics.get("epoch", len(self.epochs))) - 1
        step = self._armed_at[0] - 1
        pending, self._pending = self._pending, GO_ON
        if self.rank != 0:  # every rank sees the same metrics: rank 0 judges, fit agrees the action
            return pending
        return _graver(
            pending,
            self._act(
                [
                    (name, judge(self.epochs, self.rules[name]), fix)
                    for name, (judge, fix) in EPOCH_RULES.items()
                    if name in self.rules
                ],
                step,
                epoch,
            ),
        )

    def _act(self, verdicts: list[tuple[str, str | None, str]], step: int, epoch: int) -> Decision:
        """Keep each rule's first finding; the gravest action among new ones decides."""
        fired = {f.rule for f in self.findings}
        decision = GO_ON
        for name, evidence, fix in verdicts:
            if evidence is None or name in fired:
                continue
            action = self.rules[name].action
            finding = Finding(name, step, epoch, self.rank, evidence, fix, action)
            self.findings.append(finding)
            if action != "record":
                self.on_finding(finding)
            if action in ("stop", "fail") and decision.action is not Action.FAIL:
                decision = Decision(
                    Action.FAIL if action == "fail" else Action.STOP, f"{STOPPED}{finding.said()}", name
                )
        return decision

    def resume(self, files: Mapping[str, bytes]) -> None:
        """Go on from the capture and findings a checkpoint kept: the report covers the whole
        run, and a rule that fired before the interruption does not fire again."""
        findings = findings_of(files)
        self.findings = [f for f in findings if f.rank == self.rank]
        if self.rank == 0:
            self._earlier = {name: rows_of(files.get(name)) for name in (LAYERS_FILE, STEPS_FILE)}

    def files(self) -> dict[str, bytes]:
        """The capture and findings of every rank so far, as the run keeps them; a collective
        where the run has several ranks (every rank calls it, rank 0's result is whole)."""
        if self._profiler is not None:  # the run reports before its profiled steps are done
            self._end_profile()
        if self._armed and not self.capture.armed:
            # Captured since the last judgement: kept (and judged) now, so the checkpoint holds
            # it and a run resumed from it has the capture the uninterrupted run has.
            self._pending = _graver(self._pending, self._take())
        ranks = self.gather((self.snapshots, self.findings))
        snapshots = [s for snaps, _ in ranks for s in snaps]
        findings = [f for _, found in ranks for f in found]
        layers = self._earlier[LAYERS_FILE] + [
            {"step": s.step, "epoch": s.epoch, "rank": s.rank, **dataclasses.asdict(layer)}
            for s in snapshots
            for layer in s.layers
        ]
        steps = self._earlier[STEPS_FILE] + [
            {
                "step": s.step,
                "epoch": s.epoch,
                "rank": s.rank,
                "rss_mb": s.rss_mb,
                "cpu_util": s.cpu_util,
                "gpu_util": s.gpu_util,
                "gpu_mb": s.gpu_mb,
                "alpha": s.alpha,
                "gradient_noise": s.gradient_noise,
                **(dataclasses.asdict(s.times) if s.times is not None else _NO_TIMES),
            }
            for s in snapshots
        ]
        kept = {
            LAYERS_FILE: _parquet(layers),
            STEPS_FILE: _parquet(steps),
            FINDINGS_FILE: json.dumps([dataclasses.asdict(f) for f in findings], indent=1).encode(),
        }
        if self.trace is not None:
            kept[TRACE_FILE] = self.trace
        if self.tensors:
            buffer = io.BytesIO()
            torch.save(self.tensors, buffer)
            kept[TENSORS_FILE] = buffer.getvalue()
        return kept


def _graver(first: Decision, second: Decision) -> Decision:
    """The graver of two decisions: fail over stop over continue (the first of equals)."""
    order = {Action.CONTINUE: 0, Action.STOP: 1, Action.FAIL: 2}
    return second if order[second.action] > order[first.action] else first


_NO_TIMES = {name: None for name in StepTimes.__dataclass_fields__}
"""A capture whose window held no batch (a run resumed at a capture step)."""


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def rows_of(content: bytes | None) -> list[dict[str, Any]]:
    """The rows of one of the capture's Parquet files (none when it is missing)."""
    return pq.read_table(io.BytesIO(content)).to_pylist() if content else []


def findings_of(files: Mapping[str, bytes]) -> list[Finding]:
    """The findings the debugger's files hold (none when they hold no findings file)."""
    return [Finding(**f) for f in json.loads(files.get(FINDINGS_FILE, b"[]"))]


STOPPED = "debug rule "
"""How the reason of a run a rule stopped or failed begins: ``debug rule <rule> at step …``."""


def rule_of(reason: str) -> str:
    """The rule named by the reason of a run a rule stopped or failed."""
    return reason.removeprefix(STOPPED).split()[0]
