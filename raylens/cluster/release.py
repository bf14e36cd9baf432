"""Releasing models: the quality gate as a value, and aliases moved with a reason, never rewritten.

The gate (``judge``) compares a candidate with the version at ``production`` on the same test rows:
the difference of their metric with a paired bootstrap confidence interval (each resample draws
the same rows for both models), so a lucky split is not a better model. It returns a ``Verdict``
— every check with its evidence — and moves nothing; the pipeline acts on it.

Aliases (``staging``, ``production``) move through ``move_alias``, which appends the move (the
version, the one before, the reason, when and who) to the registered model's tags. ``rollback``
replays that history: a promotion pushes a version, a rollback pops one, so a second rollback goes
further back instead of undoing the first. Nothing already recorded is changed.
"""

from __future__ import annotations

import getpass
import json
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from raylens.cluster.release_config import GATE_METRICS, ReleaseConfig
from raylens.errors import UserError, did_you_mean

HISTORY_TAG = "raylens.alias.{alias}.{number:05d}"
"""One registered-model tag per alias move, numbered in order: the history is the tags."""
PROMOTE, ROLLBACK = "promote", "rollback"
EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class Outputs:
    """What a model said about the test rows: labels, and class probabilities for a classifier
    (columns in the order of ``classes``)."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None


@dataclass(frozen=True)
class Comparison:
    """Candidate minus production on the gate's metric, signed so that positive is better."""

    metric: str
    candidate: float
    production: float
    improvement: float
    low: float
    high: float
    confidence: float
    rows: int


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    """The gate's decision and its evidence."""

    checks: tuple[Check, ...]
    comparison: Comparison | None
    metric: str
    candidate_value: float
    first_release: bool
    measured: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    """What the evidence cannot show, said beside it (e.g. models of different data versions)."""

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[str]:
        return [check.detail for check in self.checks if not check.passed]

    def summary(self) -> str:
        head = "passed" if self.passed else "failed"
        return f"gate {head}: " + "; ".join([check.detail for check in self.checks] + list(self.notes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "metric": self.metric,
            "candidate": self.candidate_value,
            "first_release": self.first_release,
            "comparison": asdict(self.comparison) if self.comparison else None,
            "checks": [asdict(check) for check in self.checks],
            "measured": dict(self.measured),
            "notes": list(self.notes),
        }


def gate_metric(config: ReleaseConfig, task: str) -> tuple[str, str]:
    """The metric the gate compares and its mode, checked against the task."""
    metrics = GATE_METRICS[task]
    metric: str = config.metric or next(iter(metrics))
    if metric not in metrics:
        raise UserError(
            f"release.metric: '{metric}' is not a metric of a {task} model; use one of "
            f"{', '.join(metrics)}{did_you_mean(metric, metrics)}"
        )
    return metric, metrics[metric]


def row_scores(metric: str, y: np.ndarray, outputs: Outputs) -> np.ndarray:
    """Each test row's contribution to ``metric`` (its mean over rows is the metric, but for
    RMSE: the root of the mean)."""
    if metric == "accuracy":
        return (outputs.labels == y).astype(np.float64)
    if metric == "log_loss":
        if outputs.probabilities is None:
            raise ValueError("log_loss needs class probabilities")
        picked = outputs.probabilities[np.arange(len(y)), y.astype(np.int64)]
        return -np.log(np.clip(picked, EPS, None))
    error = outputs.labels.astype(np.float64) - y.astype(np.float64)
    return error**2 if metric == "rmse" else np.abs(error)


def aggregate(metric: str, scores: np.ndarray, axis: int | None = None) -> Any:
    means = np.mean(scores, axis=axis)
    return np.sqrt(means) if metric == "rmse" else means


def paired_bootstrap(
    metric: str,
    mode: str,
    candidate: np.ndarray,
    production: np.ndarray,
    *,
    resamples: int,
    confidence: float,
    seed: int,
) -> Comparison:
    """The improvement of the candidate over production (positive: better) with a percentile
    confidence interval from ``resamples`` resamples of the rows, the same rows for both."""
    rows = len(candidate)
    sign = 1.0 if mode == "max" else -1.0
    rng = np.random.default_rng(seed)
    improvements = np.empty(resamples)
    block = max(1, min(256, (1 << 22) // max(rows, 1)))  # resamples at a time: ~4M drawn rows at most
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        index = rng.integers(0, rows, size=(count, rows))
        difference = aggregate(metric, candidate[index], axis=1) - aggregate(
            metric, production[index], axis=1
        )
        improvements[start : start + count] = sign * difference
    tail = (1 - confidence) / 2
    low, high = np.quantile(improvements, [tail, 1 - tail])
    first, second = float(aggregate(metric, candidate)), float(aggregate(metric, production))
    return Comparison(
        metric, first, second, sign * (first - second), float(low), float(high), confidence, rows
    )


def judge(
    config: ReleaseConfig,
    task: str,
    y: np.ndarray,
    candidate: Outputs,
    production: Outputs | None,
    *,
    latency_ms: float | None = None,
    size_mb: float | None = None,
    failed_rules: list[str] | None = None,
) -> Verdict:
    """The gate: the candidate against production on the same rows ``y`` (and, where the spec
    sets them, an absolute threshold, latency and size). Without production, a first release is
    judged on the absolute thresholds alone. ``failed_rules``: the debugger findings of the
    candidate's training whose rule has action ``fail`` (None: not known, no check)."""
    if not len(y):
        raise UserError("the test split has no rows: the gate has nothing to compare; raise data.split.test")
    metric, mode = gate_metric(config, task)
    mine = row_scores(metric, y, candidate)
    value = float(aggregate(metric, mine))
    checks: list[Check] = []
    comparison = None
    if production is not None:
        comparison = paired_bootstrap(
            metric,
            mode,
            mine,
            row_scores(metric, y, production),
            resamples=config.resamples,
            confidence=config.confidence,
            seed=config.seed,
        )
        better = comparison.low > config.margin
        checks.append(
            Check(
                "beats production",
                better,
                f"{metric} {comparison.candidate:.4f} vs production {comparison.production:.4f}: "
                f"improvement {comparison.improvement:+.4f}, {comparison.confidence:.0%} interval "
                f"[{comparison.low:+.4f}, {comparison.high:+.4f}] over {comparison.rows} rows "
                f"{'clears' if better else 'does not clear'} the margin {config.margin:g}",
            )
        )
    if config.threshold is not None:
        met = value >= config.threshold if mode == "max" else value <= config.threshold
        bound = "at least" if mode == "max" else "at most"
        checks.append(Check("threshold", met, f"{metric} {value:.4f} (must be {bound} {config.threshold:g})"))
    measured = {}
    if config.max_latency_ms is not None and latency_ms is not None:
        measured["latency_ms"] = latency_ms
        checks.append(
            Check(
                "latency",
                latency_ms <= config.max_latency_ms,
                f"latency {latency_ms:.1f} ms per request (at most {config.max_latency_ms:g})",
            )
        )
    if config.max_size_mb is not None and size_mb is not None:
        measured["size_mb"] = size_mb
        checks.append(
            Check(
                "size",
                size_mb <= config.max_size_mb,
                f"size {size_mb:.1f} MB (at most {config.max_size_mb:g})",
            )
        )
    if failed_rules is not None:
        checks.append(
            Check(
                "debugger",
                not failed_rules,
                f"debugger rules with action fail fired: {'; '.join(failed_rules)}"
                if failed_rules
                else "no debugger rule with action fail fired in training",
            )
        )
    if production is None and not any(check.name != "debugger" for check in checks):
        checks.append(
            Check("first release", True, f"no production version yet: released on {metric} {value:.4f}")
        )
    elif production is None:
        checks.insert(0, Check("first release", True, "no production version yet: judged on thresholds"))
    return Verdict(tuple(checks), comparison, metric, value, production is None, measured)


# ----- the models' outputs ----------------------------------------------------------------------


def model_outputs(model: Any, frame: Any, classes: list[Any] | None) -> Outputs:
    """A loaded pyfunc model's labels (class indices of ``classes`` for a classifier) and class
    probabilities on ``frame``."""
    predicted = np.asarray(model.predict(frame))
    if classes is None:
        return Outputs(predicted.astype(np.float64))
    index = {str(label): i for i, label in enumerate(classes)}
    labels = np.array([index.get(str(label), -1) for label in predicted])
    frame_probabilities = model.predict(frame, params={"output": "probabilities"})
    probabilities = np.zeros((len(frame), len(classes)))
    for column in frame_probabilities.columns:
        if column in index:  # a class the other model does not know scores as probability 0
            probabilities[:, index[column]] = frame_probabilities[column].to_numpy()
    return Outputs(labels, probabilities)


def latency_ms(model: Any, frame: Any, calls: int = 20) -> float:
    """The median time the model takes to answer a one-row request."""
    row = frame.iloc[:1]
    model.predict(row)  # the first call warms caches
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model.predict(row)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


# ----- aliases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AliasMove:
    alias: str
    version: str
    previous: str | None
    reason: str
    kind: str
    at: str
    by: str


def alias_history(client: Any, name: str, alias: str) -> list[AliasMove]:
    """Every recorded move of ``alias`` on registered model ``name``, oldest first."""
    tags = registered_model(client, name).tags
    moves = [json.loads(value) for key, value in sorted(tags.items()) if _is_move(key, alias)]
    return [AliasMove(**move) for move in moves]


def current_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def move_alias(
    client: Any, name: str, alias: str, version: str, reason: str, *, kind: str = PROMOTE
) -> AliasMove:
    """Point ``alias`` of ``name`` at ``version`` and record why; ``UserError`` for an unknown
    model or version (nothing moved)."""
    from mlflow.exceptions import MlflowException

    if not reason.strip():
        raise UserError("--reason: say why the alias moves; it is kept in the model's history")
    registered_model(client, name)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise UserError(
            f"VERSION: registered model '{name}' has no version {version}; it has: "
            f"{', '.join(map(str, versions)) or 'none'}"
        ) from None
    previous = current_version(client, name, alias)
    move = AliasMove(
        alias,
        str(version),
        previous,
        reason.strip(),
        kind,
        datetime.now(UTC).isoformat(timespec="seconds"),
        _user(),
    )
    if previous == str(version):  # already there (a resumed step, a repeated promote): no move
        return move
    numbers = [
        int(key.rsplit(".", 1)[1]) for key in registered_model(client, name).tags if _is_move(key, alias)
    ]
    # The alias first: a move whose record failed is still the alias's state, never the reverse.
    client.set_registered_model_alias(name, alias, str(version))
    client.set_registered_model_tag(
        name, HISTORY_TAG.format(alias=alias, number=max(numbers, default=0) + 1), json.dumps(asdict(move))
    )
    client.set_model_version_tag(name, str(version), f"raylens.{alias}.reason", move.reason)
    return move


def _is_move(key: str, alias: str) -> bool:
    prefix = f"raylens.alias.{alias}."
    return key.startswith(prefix) and key[len(prefix) :].isdigit()


def rollback(client: Any, name: str, alias: str, reason: str) -> AliasMove:
    """Point ``alias`` back at the version it held before the current one was promoted."""
    stack = promoted_stack(alias_history(client, name, alias))
    if len(stack) < 2:
        held = f"only version {stack[-1]} has held it" if stack else "no version has held it"
        raise UserError(f"'{name}@{alias}': nothing to roll back to; {held}")
    return move_alias(client, name, alias, stack[-2], reason, kind=ROLLBACK)


def promoted_stack(history: list[AliasMove]) -> list[str]:
    """The versions an alias went through, a rollback undoing the promotion before it."""
    stack: list[str] = []
    for move in history:
        if move.kind == ROLLBACK and stack:
            stack.pop()
        else:
            stack.append(move.version)
    return stack


def production_version(client: Any, name: str) -> str | None:
    """The version at ``name``'s production alias; None when there is none, or no such model."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    return current_version(client, name, "production")


def registered_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models()]
        raise UserError(
            f"MODEL: no registered model '{name}'{did_you_mean(name, names)}; registered: "
            f"{', '.join(names) or 'none'}"
        ) from None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
