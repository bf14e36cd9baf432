"""What a finished run keeps of its debugger: the capture (Parquet), the findings (JSON, and
MLflow tags), plots (per-layer gradient norms over time, activation saturation, the step-time
breakdown per rank, the step size and gradient noise) and one HTML report with them all."""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from raylens.trainer.debug.debugger import (
    FINDINGS_FILE,
    LAYERS_FILE,
    STEPS_FILE,
    TENSORS_FILE,
    TRACE_FILE,
    findings_of,
    rows_of,
    rule_of,
)
from raylens.trainer.debug.rules import Finding
from raylens.trainer.tracking import Tracker

PHASES = ("data", "forward", "backward", "optimizer")
REPORT_FILE = "debug/report.html"


def read_debug(checkpoint: Path | str, filesystem: pyarrow.fs.FileSystem | None = None) -> dict[str, bytes]:
    """The debugger's files a checkpoint keeps (empty when it has none): a local folder, or a
    path on ``filesystem`` (a persisted Ray checkpoint's)."""
    fs = filesystem or pyarrow.fs.LocalFileSystem()
    found = {}
    for name in (LAYERS_FILE, STEPS_FILE, FINDINGS_FILE, TRACE_FILE, TENSORS_FILE):
        path = f"{str(checkpoint).rstrip('/')}/{name}"
        if fs.get_file_info(path).type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(path) as stream:
                found[name] = stream.read()
    return found


def _lines_figure(
    series: Mapping[str, list[tuple[int, float]]], ylabel: str, title: str, *, log: bool = False
) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        ax.plot(*zip(*points, strict=True), marker=".", label=label)
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def gradient_norms_figure(layers: Sequence[Mapping[str, Any]]) -> Figure:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in layers:
        if row["kind"] == "weights" and row["rank"] == 0 and row["grad_norm"] == row["grad_norm"]:
            series.setdefault(row["layer"], []).append((row["step"], max(row["grad_norm"], 1e-30)))
    return _lines_figure(series, "gradient norm", "per-layer gradient norms (rank 0)", log=True)


def activations_figure(layers: Sequence[Mapping[str, Any]]) -> Figure:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in layers:
        if row["kind"] != "weights" and row["rank"] == 0:
            value = row["zero"] if row["kind"] == "relu" else row["saturated"]
            series.setdefault(f"{row['layer']} ({row['kind']})", []).append((row["step"], value))
    return _lines_figure(series, "share of outputs", "activations: saturated (sigmoid, tanh) or zero (ReLU)")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and value == value and abs(value) != float("inf")


def step_times_figure(steps: Sequence[Mapping[str, Any]]) -> Figure:
    """Each rank's time per batch, by phase, over the run: a stacked bar per rank; under DDP,
    backward split where the gradients' all-reduce was in flight."""
    ranks = sorted({row["rank"] for row in steps if row.get("batches")})
    comm = any(_finite(row.get("communication")) for row in steps)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(ranks) + 2), 4))
    bottoms = [0.0] * len(ranks)
    for phase in ("data", "forward", "backward", "communication", "optimizer") if comm else PHASES:
        heights = []
        for rank in ranks:
            mine = [row for row in steps if row["rank"] == rank and row.get("batches")]
            batches = sum(row["batches"] for row in mine)
            spent = sum(_time_in(row, phase, comm) for row in mine)
            heights.append(1000 * spent / batches if batches else 0.0)
        label = {"backward": "backward, no all-reduce in flight", "communication": "all-reduce in flight"}
        ax.bar(
            [str(r) for r in ranks], heights, bottom=bottoms, label=label.get(phase, phase) if comm else phase
        )
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_xlabel("rank")
    ax.set_ylabel("ms per batch")
    ax.set_title("step time by phase")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _time_in(row: Mapping[str, Any], phase: str, comm: bool) -> float:
    """A capture window's seconds in ``phase``; with ``comm``, backward less the all-reduce
    (which overlaps it) and the all-reduce on its own."""
    communication = row.get("communication") if _finite(row.get("communication")) else 0.0
    if comm and phase == "backward":
        return max(0.0, row["backward"] - communication)
    if phase == "communication":
        return min(communication, row["backward"])
    return float(row[phase])


def signals_figure(steps: Sequence[Mapping[str, Any]]) -> Figure:
    """Cockpit's step size alpha and the gradient noise over the run (rank 0)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    mine = [row for row in steps if row["rank"] == 0]
    alphas = [(row["step"], row["alpha"]) for row in mine if _finite(row.get("alpha"))]
    noises = [(row["step"], row["gradient_noise"]) for row in mine if _finite(row.get("gradient_noise"))]
    if alphas:
        top.plot(*zip(*alphas, strict=True), marker=".")
    top.axhline(0, color="grey", linewidth=0.8)
    top.set_ylabel("alpha")
    top.set_title("step size alpha (-1: barely moved, 0: to the minimum, >1: overshot)")
    if noises:
        bottom.plot(*zip(*noises, strict=True), marker=".")
        bottom.set_yscale("log")
    bottom.axhline(1, color="grey", linewidth=0.8)
    bottom.set_ylabel("gradient noise")
    bottom.set_xlabel("step")
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def report_html(files: Mapping[str, bytes], title: str) -> str:
    findings = findings_of(files)
    layers, steps = rows_of(files.get(LAYERS_FILE)), rows_of(files.get(STEPS_FILE))
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (f.rule, f.action, f.step, f.epoch + 1, f.rank, f.evidence, f.fix)
        )
        + "</tr>"
        for f in findings
    )
    table = (
        "<table><tr><th>rule</th><th>action</th><th>step</th><th>epoch</th><th>rank</th>"
        f"<th>evidence</th><th>fix</th></tr>{rows}</table>"
        if findings
        else "<p>No rule fired.</p>"
    )
    figures = [
        gradient_norms_figure(layers),
        activations_figure(layers),
        step_times_figure(steps),
        signals_figure(steps),
    ]
    images = "".join(f'<img src="data:image/png;base64,{_png(fig)}">' for fig in figures)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif} td,th{border:1px solid #ccc;padding:4px}"
        "table{border-collapse:collapse}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><h2>Findings</h2>{table}<h2>Capture</h2>{images}</body></html>"
    )


def record_debug(
    tracker: Tracker, run_id: str, files: Mapping[str, bytes], stopped_by: str | None = None
) -> list[Finding]:
    """The run's capture, findings, and report into its MLflow run; the findings' rules as the
    ``raylens.debug.findings`` tag. Returns the findings."""
    if not files and stopped_by is None:
        return []
    findings = findings_of(files)
    for name, content in files.items():
        if name == FINDINGS_FILE:
            tracker.log_dict(run_id, json.loads(content), name)
        else:
            tracker.log_bytes(run_id, content, name)
    if files:
        tracker.log_text(run_id, report_html(files, f"debugger report of run {run_id}"), REPORT_FILE)
    rules = sorted({f.rule for f in findings})
    if stopped_by is not None:
        rules = sorted({*rules, rule_of(stopped_by)})
    tracker.set_tags(run_id, {"raylens.debug.findings": ",".join(rules) or "none"})
    return findings


@dataclass(frozen=True)
class RunDebug:
    """A finished run's debugger record, as ``raylens debug`` shows it."""

    run_id: str
    status: str
    findings: list[Finding]
    timeline: list[dict[str, Any]]
    """Rank 0's captures in order: step, epoch, ms per batch, each phase's share, memory."""
    stopped_by: str | None
    report_uri: str | None


@dataclass(frozen=True)
class TrialDebug:
    """One trial of a sweep: its run, status and the rules that fired in it."""

    run_id: str
    name: str
    status: str
    rules: list[str]
    stopped_by: str | None


def _timeline(steps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    timeline = []
    for row in steps:
        if row["rank"] != 0 or not row.get("batches"):
            continue
        total = sum(row[phase] for phase in PHASES) or 1.0
        timeline.append(
            {
                "step": row["step"],
                "epoch": row["epoch"] + 1,
                "ms_per_batch": 1000 * total / row["batches"],
                **{phase: row[phase] / total for phase in PHASES},
                "communication": _share_of(row.get("communication"), total),
                "rss_mb": row["rss_mb"],
                "cpu_util": row.get("cpu_util"),
                "gpu_util": row.get("gpu_util"),
                "alpha": row.get("alpha") if _finite(row.get("alpha")) else None,
                "gradient_noise": row.get("gradient_noise") if _finite(row.get("gradient_noise")) else None,
            }
        )
    return timeline


def _share_of(seconds: Any, total: float) -> float | None:
    return seconds / total if _finite(seconds) else None


def run_debug(client: Any, run_id: str) -> RunDebug:
    """What run ``run_id`` of ``client`` (an ``mlflow.MlflowClient``) keeps of its debugger."""
    import mlflow

    run = client.get_run(run_id)
    root = run.info.artifact_uri
    names = {f.path for f in client.list_artifacts(run_id, "debug")}

    def load(name: str) -> bytes | None:
        if name not in names:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return Path(mlflow.artifacts.download_artifacts(f"{root}/{name}", dst_path=tmp)).read_bytes()

    findings_raw = load(FINDINGS_FILE)
    findings = findings_of({FINDINGS_FILE: findings_raw} if findings_raw else {})
    return RunDebug(
        run_id,
        run.info.status,
        findings,
        _timeline(rows_of(load(STEPS_FILE))),
        run.data.tags.get("raylens.stopped_by"),
        f"{root}/{REPORT_FILE}" if REPORT_FILE in names else None,
    )


def sweep_debug(client: Any, experiment_id: str, run_id: str) -> list[TrialDebug]:
    """The rules that fired in each trial of the sweep whose root run is ``run_id``."""
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=5000
    )
    trials = []
    for child in sorted(children, key=lambda r: r.info.start_time or 0):
        fired = child.data.tags.get("raylens.debug.findings", "")
        trials.append(
            TrialDebug(
                child.info.run_id,
                child.info.run_name or child.info.run_id,
                child.info.status,
                [] if fired in ("", "none") else fired.split(","),
                child.data.tags.get("raylens.stopped_by"),
            )
        )
    return trials
