"""Plots people would rather look at than read: the confusion matrix, the learning curves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: training runs on machines without a display

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure


def confusion_matrix_figure(matrix: np.ndarray, labels: Sequence[Any], title: str) -> Figure:
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), [str(v) for v in labels], rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), [str(v) for v in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    fig.tight_layout()
    return fig


def learning_curves_figure(history: Sequence[dict[str, float]]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "valid_loss"):
        # train_loss is an epoch's: mid-epoch evaluations (eval_every_steps) have valid_loss only.
        points = [(m["epoch"], m[key]) for m in history if key in m]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    return fig


def pareto_figure(points: Sequence[tuple[str, float, float, bool]], metric: str, title: str) -> Figure:
    """Trials as (label, p95 latency ms, metric, on the front): the front joined by a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = sorted({label for label, *_ in points})
    for label in labels:
        mine = [(lat, score) for name, lat, score, _ in points if name == label]
        ax.scatter(*zip(*mine, strict=True), label=label, alpha=0.7)
    front = sorted((lat, score) for _, lat, score, on_front in points if on_front)
    if front:
        ax.plot(*zip(*front, strict=True), color="black", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("prediction latency p95 (ms per row)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
