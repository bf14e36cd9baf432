"""The debugger: a ``loop.Monitor`` that captures the run's state every ``debug.every`` steps,
judges each capture and each epoch with the spec's rules, and acts on what they find (record,
warn, stop, fail). Every rank runs one; their stop and fail decisions are agreed by ``fit``."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from torch import nn
from torch.optim import Optimizer

from raylens.trainer.debug.capture import Capture, PhaseClock, Snapshot, rss_mb
from raylens.trainer.debug.rules import EPOCH_RULES, STEP_RULES, Finding
from raylens.trainer.debug.settings import DebugConfig
from raylens.trainer.loop import GO_ON, Action, Decision, StepView

logger = logging.getLogger("raylens.debug")

LAYERS_FILE, STEPS_FILE, FINDINGS_FILE = "debug/layers.parquet", "debug/steps.parquet", "debug/findings.json"
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
    ) -> None:
        self.every = config.every
        self.rules = config.rules.active()
        self.rank, self.gather = rank, gather
        self.on_finding = on_finding or (lambda finding: logger.warning("%s", finding.said()))
        activations = any(name in self.rules for name in _ACTIVATION_RULES)
        self.capture = Capture(model, optimizer, config.layers, activations=activations)
        self.clock = PhaseClock()
        self.snapshots: list[Snapshot] = []
        self.epochs: list[dict[str, float]] = []
        self.findings: list[Finding] = []
        self._armed_at = (0, 0)  # (step, epoch) of the step being captured
        self._epoch = 0

    # The loop's heartbeat: time every batch's phases.
    def beat(self, epoch: int, step: int, phase: int) -> None:
        self.clock.beat(epoch, step, phase)

    def pause(self) -> None:
        self.clock.pause()

    def on_step(self, view: StepView) -> Decision:
        decision = GO_ON
        taken = self.capture.taken()
        if taken is not None:
            step, epoch = self._armed_at
            snapshot = Snapshot(step, epoch, self.rank, taken, self.clock.window(), rss_mb())
            earlier = list(self.snapshots)
            self.snapshots.append(snapshot)
            decision = self._act(
                [
                    (name, judge(snapshot, earlier, self.rules[name]), fix)
                    for name, (judge, fix) in STEP_RULES.items()
                    if name in self.rules
                ],
                step,
                epoch,
            )
        self.capture.arm()
        self._armed_at = (view.step + 1, view.epoch)
        return decision

    def on_epoch(self, metrics: dict[str, float]) -> Decision:
        self.epochs.append(dict(metrics))
        epoch = int(metrics.get("epoch", len(self.epochs))) - 1
        step = self._armed_at[0] - 1
        return self._act(
            [
                (name, judge(self.epochs, self.rules[name]), fix)
                for name, (judge, fix) in EPOCH_RULES.items()
                if name in self.rules
            ],
            step,
            epoch,
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
                    Action.FAIL if action == "fail" else Action.STOP, f"debug rule {finding.said()}", name
                )
        return decision

    def files(self) -> dict[str, bytes]:
        """The capture and findings of every rank so far, as the run keeps them; a collective
        where the run has several ranks (every rank calls it, rank 0's result is whole)."""
        ranks = self.gather((self.snapshots, self.findings))
        snapshots = [s for snaps, _ in ranks for s in snaps]
        findings = [f for _, found in ranks for f in found]
        layers = [
            {"step": s.step, "epoch": s.epoch, "rank": s.rank, **dataclasses.asdict(layer)}
            for s in snapshots
            for layer in s.layers
        ]
        steps = [
            {
                "step": s.step,
                "epoch": s.epoch,
                "rank": s.rank,
                "rss_mb": s.rss_mb,
                **(dataclasses.asdict(s.times) if s.times is not None else {}),
            }
            for s in snapshots
        ]
        return {
            LAYERS_FILE: _parquet(layers),
            STEPS_FILE: _parquet(steps),
            FINDINGS_FILE: json.dumps([dataclasses.asdict(f) for f in findings], indent=1).encode(),
        }


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def findings_of(files: Mapping[str, bytes]) -> list[Finding]:
    return [Finding(**f) for f in json.loads(files[FINDINGS_FILE])]
