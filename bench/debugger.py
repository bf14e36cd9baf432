"""The debugger's cost: training steps per second with the debugger off, with its defaults (every
rule, a capture every 50 steps) and with every rule and per-layer activation capture every 5
steps, on the trainer benchmark's MLP in one process. The ratios are on ÷ off; the one printed
last is the defaults'.

The three run in turn, 15 rounds in rotated order, the machine being shared and noisy; each
ratio is the median over rounds of that round's on ÷ off (one epoch's steps per second each).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

import torch
from torch import nn

from raylens.trainer.debug.debugger import Debugger
from raylens.trainer.debug.settings import DebugConfig
from raylens.trainer.loop import Batches, TrainState, fit
from raylens.trainer.task import TaskSpec

HIDDEN = [256, 256]
BATCH = 256


class _Discard:
    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        pass


def _model(features: int, classes: int) -> nn.Module:
    widths = [features, *HIDDEN]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], classes))


def steps_per_second(data: Batches, task: TaskSpec, debug: DebugConfig | None) -> float:
    torch.manual_seed(0)
    model = _model(data.x.shape[1], task.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    debugger = Debugger(debug, model, optimizer) if debug is not None else None
    started = time.perf_counter()
    fit(
        model,
        optimizer,
        data,
        task,
        epochs=1,
        batch_size=BATCH,
        seed=0,
        reporter=_Discard(),
        monitors=[debugger] if debugger is not None else [],
        heartbeat=debugger,
    )
    return -(-len(data) // BATCH) / (time.perf_counter() - started)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows, rounds = (4096, 2) if args.quick else (20_000, 15)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=generator)
    task = TaskSpec("classification", num_classes=10)
    data = Batches(x, (x[:, :10].argmax(1)).long())
    settings = {
        "off": None,
        "default": DebugConfig(),
        "all_every_5": DebugConfig(every=5, rules={"update_ratio": "warn", "step_time_outlier": "warn"}),
    }
    figures: dict[str, list[float]] = {name: [] for name in settings}
    steps_per_second(data, task, None)  # warm-up
    names = list(settings)
    for round_ in range(rounds):
        # Each round in a rotated order: no setting always runs first (or after the same one).
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            figures[name].append(steps_per_second(data, task, settings[name]))
    median = {name: statistics.median(values) for name, values in figures.items()}

    def paired(name: str) -> float:
        """The median over rounds of the round's ratio to the run without the debugger."""
        return statistics.median(on / off for on, off in zip(figures[name], figures["off"], strict=True))

    return {
        "steps_per_s_off": median["off"],
        "steps_per_s_default": median["default"],
        "steps_per_s_all_every_5": median["all_every_5"],
        "all_every_5_vs_off": paired("all_every_5"),
        "default_vs_off": paired("default"),
    }
