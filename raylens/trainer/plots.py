"""Plots people would rather look at than read: the confusion matrix, the learning curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def pareto_figure(
    points: Sequence[tuple[str, float, float, bool]],
    metric: str,
    title: str,
    *,
    xlabel: str = "prediction latency p95 (ms per row)",
    log_x: bool = True,
) -> Figure:
    """Trials as (label, cost, metric, on the front): the front joined by a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = sorted({label for label, *_ in points})
    for label in labels:
        mine = [(lat, score) for name, lat, score, _ in points if name == label]
        ax.scatter(*zip(*mine, strict=True), label=label, alpha=0.7)
    front = sorted((lat, score) for _, lat, score, on_front in points if on_front)
    if front:
        ax.plot(*zip(*front, strict=True), color="black", linewidth=1, label="Pareto front")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def importance_figure(shares: Mapping[str, float], metric: str) -> Figure:
    """Each searched value's share of the metric's variance over the trials (fANOVA), largest on
    top: which values were worth searching."""
    names = list(shares)[::-1]
    fig, ax = plt.subplots(figsize=(6, max(2.0, 0.4 * len(names) + 1)))
    ax.barh(names, [shares[n] for n in names])
    ax.set_xlabel(f"share of {metric}'s variance (fANOVA)")
    ax.set_xlim(0, 1)
    ax.set_title("parameter importance")
    fig.tight_layout()
    return fig


def trials_figure(curves: dict[str, list[tuple[float, float]]], metric: str) -> Figure:
    """Every trial's metric by epoch, one line each: where the sweep's trials were stopped and
    which kept improving."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", linewidth=1, alpha=0.8, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of every trial")
    if len(curves) <= 12:
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def parallel_coordinates_figure(rows: Sequence[dict[str, float]], axes: Sequence[str], metric: str) -> Figure:
    """One line per trial across its numeric values (each axis scaled to its own range, log where
    the values span more than two decades) and the metric, coloured by the metric."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * (len(axes) + 1)), 4))
    names = [*axes, metric]
    columns = []
    for name in names:
        values = np.array([row.get(name, np.nan) for row in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
            values = np.log10(values)
            finite = np.log10(finite)
        low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        columns.append((values - low) / (high - low) if high > low else np.full_like(values, 0.5))
    scaled = np.column_stack(columns) if columns else np.empty((0, 0))
    scores = np.array([row.get(metric, np.nan) for row in rows], dtype=np.float64)
    colours = plt.get_cmap("viridis")(
        (scores - np.nanmin(scores)) / (np.ptp(scores[np.isfinite(scores)]) or 1)
    )
    for line, colour in zip(scaled, colours, strict=True):
        ax.plot(range(len(names)), line, color=colour, alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize="small")
    ax.set_yticks([])
    ax.set_title("trials: values and metric (each axis scaled to its range)")
    fig.tight_layout()
    return fig
