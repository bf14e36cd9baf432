"""The leaderboard of a sweep: its completed trials ranked on the success metric, with what each
model costs — training time, one row's prediction latency (p50/p95), size, peak memory — the
permutation importances of each candidate's best, the Pareto front of metric against latency,
and the winner: the best trial that meets ``tune.constraints``.

Costs are measured here, on the driver, from each trial's last checkpoint (the model the trial
ended with), on the validation split, one row at a time: the same machine and load for every
trial, so they compare. A trial without a checkpoint (a several-worker trial) shows its
training time only, and cannot meet a constraint it was not measured on.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raylens.errors import UserError
from raylens.tuning.config import ConstraintsConfig

LEADERBOARD = "leaderboard.json"
"""The sweep run's artifact holding the leaderboard (``raylens leaderboard RUN_ID`` reads it)."""
LATENCY_ROWS = 100
"""Rows predicted one at a time for the latency percentiles."""
WARMUP_CALLS = 5
TOP_IMPORTANCES = 5


@dataclass(frozen=True)
class Costs:
    train_seconds: float
    predict_p50_ms: float | None = None
    predict_p95_ms: float | None = None
    model_mb: float | None = None
    peak_rss_mb: float | None = None


@dataclass(frozen=True)
class Row:
    trial_id: str
    candidate: str
    score: float
    """The sweep's metric, as the trial last reported it."""
    costs: Costs
    config: dict[str, Any]
    """The trial's values, as spec paths."""
    importances: list[tuple[str, float]] = field(default_factory=list)
    """Each candidate's best: the features whose shuffling hurts the metric most, and by how much."""
    misses: list[str] = field(default_factory=list)
    """Why it does not meet the constraints; empty: it does."""
    pareto: bool = False
    """On the Pareto front of the metric against p95 latency."""
    objectives: dict[str, float] = field(default_factory=dict)
    """Its values of the further objectives of a multi-objective search (tune.objectives)."""


@dataclass(frozen=True)
class Leaderboard:
    metric: str
    mode: str
    rows: list[Row]
    """Ranked: best metric first (ties: the earlier trial)."""
    constraints: dict[str, float] = field(default_factory=dict)
    objectives: dict[str, str] = field(default_factory=dict)
    """The further objectives of a multi-objective search and their modes (min, max)."""
    front: list[str] = field(default_factory=list)
    """The trials no other beats on every objective, tune.metric included (multi-objective only)."""
    parameter_importances: dict[str, float] = field(default_factory=dict)
    """How much of the metric's variance over the finished trials each searched value explains
    (Optuna's fANOVA; the shares add up to 1), the largest first; empty under 3 trials."""

    @property
    def winner(self) -> Row | None:
        return next((row for row in self.rows if not row.misses), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Leaderboard:
        rows = [
            Row(
                **{
                    **row,
                    "costs": Costs(**row["costs"]),
                    "importances": [tuple(pair) for pair in row["importances"]],
                }
            )
            for row in data["rows"]
        ]
        return cls(  # fields absent in sweeps recorded before them take their defaults
            data["metric"],
            data["mode"],
            rows,
            dict(data.get("constraints", {})),
            dict(data.get("objectives", {})),
            list(data.get("front", [])),
            dict(data.get("parameter_importances", {})),
        )

    def verdict(self) -> str:
        """One line: the winner, or why there is none."""
        winner = self.winner
        if winner is not None:
            return f"winner: {winner.candidate} (trial {winner.trial_id}), {self.metric} {winner.score:.4g}"
        return no_winner_message(self)


MIN_TRIALS_FOR_IMPORTANCE = 3


def parameter_importances(
    rows: Sequence[Row], candidates: Sequence[Any], mode: str, seed: int
) -> dict[str, float]:
    """fANOVA importance of each searched value (and, across candidates, of the candidate) for
    the metric over ``rows``, the finished trials: Optuna's ``FanovaImportanceEvaluator`` on a
    study holding them. Empty with fewer than 3 trials or when nothing varied."""
    if len(rows) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    import optuna

    from raylens.tuning.candidates import WARM_STUDY, EarlierTrial, quiet_optuna, seeded_study

    earlier = [EarlierTrial(row.candidate, row.config, row.score) for row in rows]
    storage, _ = seeded_study(earlier, list(candidates), mode)
    with quiet_optuna():
        study = optuna.load_study(study_name=WARM_STUDY, storage=storage)
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        try:
            found = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except (ValueError, RuntimeError):  # no parameter every trial has, or none that varied
            return {}
    return {name: float(share) for name, share in found.items()}


def no_winner_message(board: Leaderboard) -> str:
    limits = ", ".join(f"{name} ≤ {value:g}" for name, value in board.constraints.items())
    closest = sorted(board.rows, key=lambda row: _shortfall(row, board.constraints))[:3]
    named = "; ".join(f"{row.candidate} trial {row.trial_id}: {', '.join(row.misses)}" for row in closest)
    return (
        f"no trial meets tune.constraints ({limits}); closest: {named}. Relax tune.constraints, or add "
        "smaller or faster candidates"
    )


def _shortfall(row: Row, constraints: Mapping[str, float]) -> float:
    """How far a row is from its limits, as the sum of each ratio over 1 (unmeasured: far)."""
    total = 0.0
    for name, limit in constraints.items():
        value = getattr(row.costs, name)
        total += 1e9 if value is None else max(0.0, value / limit - 1.0)
    return total


def latency_ms(predictor: Any, x: np.ndarray, rows: int = LATENCY_ROWS) -> tuple[float, float]:
    """p50 and p95 of one row's prediction, in milliseconds, after a few calls to warm up."""
    if not len(x):
        return math.nan, math.nan
    for _ in range(WARMUP_CALLS):
        predictor.predict(x[:1])
    times = []
    for i in range(min(rows, len(x))):
        began = time.perf_counter()
        predictor.predict(x[i : i + 1])
        times.append((time.perf_counter() - began) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def permutation_importances(
    predictor: Any,
    x: np.ndarray,
    y: np.ndarray,
    task: Any,
    metric: str,
    mode: str,
    columns: Sequence[str],
    seed: int = 0,
) -> list[tuple[str, float]]:
    """How much the metric worsens when each feature's values are shuffled among the validation
    rows (scikit-learn's permutation importance, one repeat), the largest first."""
    from raylens.trainer.metrics import predicted_metrics

    name = metric.removeprefix("valid_")
    base = predicted_metrics(predictor, x, y, task).get(name)
    if base is None or not len(y):
        return []
    rng = np.random.default_rng(seed)
    drops = []
    for j, column in enumerate(columns):
        shuffled = x.copy()
        shuffled[:, j] = rng.permutation(shuffled[:, j])
        score = predicted_metrics(predictor, shuffled, y, task)[name]
        drops.append((column, float(score - base if mode == "min" else base - score)))
    return sorted(drops, key=lambda pair: -pair[1])[:TOP_IMPORTANCES]


def model_mb(family: Any, predictor: Any, config: Any) -> float:
    from raylens.trainer.family import Trained

    with tempfile.TemporaryDirectory() as tmp:
        files = family.model_files(Trained(predictor, [], Path(tmp)), config, Path(tmp))
        return sum(Path(path).stat().st_size for path in files.files.values()) / 1e6


def misses(costs: Costs, constraints: ConstraintsConfig | None) -> list[str]:
    if constraints is None:
        return []
    found = []
    for name, limit in constraints.model_dump(exclude_none=True).items():
        value = getattr(costs, name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            found.append(f"{name} not measured")
        elif value > limit:
            found.append(f"{name} {value:.3g}>{limit:g}")
    return found


def pareto_front(rows: Sequence[Row], mode: str) -> set[str]:
    """Trials no other trial beats on both the metric and p95 latency (unmeasured: left out)."""
    return non_dominated(
        {
            row.trial_id: (row.score if mode == "min" else -row.score, row.costs.predict_p95_ms)
            for row in rows
            if row.costs.predict_p95_ms is not None
        }
    )


def objectives_front(rows: Sequence[Row], mode: str, objectives: Mapping[str, str]) -> list[str]:
    """Trials no other beats on tune.metric and every further objective (a trial that did not
    report one of them is left out), in the rows' order."""
    sign = {"min": 1.0, "max": -1.0}
    points = {
        row.trial_id: (
            sign[mode] * row.score,
            *(sign[m] * row.objectives[name] for name, m in objectives.items()),
        )
        for row in rows
        if all(name in row.objectives for name in objectives)
    }
    front = non_dominated(points)
    return [row.trial_id for row in rows if row.trial_id in front]


def non_dominated(points: Mapping[str, tuple[float, ...]]) -> set[str]:
    """The keys whose values (all minimized) no other's are at most everywhere and below somewhere."""
    return {
        key
        for key, mine in points.items()
        if not any(
            all(o <= m for o, m in zip(other, mine, strict=True)) and other != mine
            for name, other in points.items()
            if name != key
        )
    }


def ranked(rows: Sequence[Row], mode: str, order: Mapping[str, int]) -> list[Row]:
    return sorted(rows, key=lambda row: (row.score if mode == "min" else -row.score, order[row.trial_id]))


def raise_without_winner(board: Leaderboard) -> None:
    """``UserError`` (nothing registered: the final training never starts) when constraints
    leave no winner."""
    if board.rows and board.winner is None:
        raise UserError(no_winner_message(board))
