"""The quality gate as a value (paired bootstrap against production, thresholds, latency, size)
and alias moves with a history that is appended to, never rewritten: MLflow (SQLite) only."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from raylens.cluster.release import (
    Outputs,
    alias_history,
    current_version,
    judge,
    move_alias,
    paired_bootstrap,
    rollback,
)
from raylens.cluster.release_config import ReleaseConfig
from raylens.errors import UserError


def labels_with_errors(y: np.ndarray, wrong: int, seed: int) -> Outputs:
    """Predictions of ``y`` with ``wrong`` rows (chosen by ``seed``) wrong."""
    rng = np.random.default_rng(seed)
    predicted = y.copy()
    rows = rng.choice(len(y), size=wrong, replace=False)
    predicted[rows] = 1 - predicted[rows]
    return Outputs(predicted)


Y = np.random.default_rng(0).integers(0, 2, size=400)


def test_a_clearly_better_candidate_passes_with_an_interval_above_the_margin() -> None:
    verdict = judge(
        ReleaseConfig(), "classification", Y, labels_with_errors(Y, 20, 1), labels_with_errors(Y, 80, 2)
    )
    assert verdict.passed, verdict.summary()
    comparison = verdict.comparison
    assert comparison is not None
    assert comparison.candidate == pytest.approx(0.95) and comparison.production == pytest.approx(0.80)
    assert comparison.improvement == pytest.approx(0.15)
    assert 0 < comparison.low < 0.15 < comparison.high


def test_a_candidate_better_by_noise_does_not_pass() -> None:
    # Two rows better out of 400: the point estimate is up, the interval is not above zero.
    verdict = judge(
        ReleaseConfig(), "classification", Y, labels_with_errors(Y, 38, 1), labels_with_errors(Y, 40, 2)
    )
    assert verdict.comparison is not None and verdict.comparison.improvement > 0
    assert not verdict.passed
    assert "does not clear the margin 0" in verdict.failures[0]


def test_a_margin_asks_for_more_than_beating_production() -> None:
    candidate, production = labels_with_errors(Y, 20, 1), labels_with_errors(Y, 80, 2)
    assert judge(ReleaseConfig(margin=0.05), "classification", Y, candidate, production).passed
    assert not judge(ReleaseConfig(margin=0.14), "classification", Y, candidate, production).passed


def test_lower_is_better_for_errors_and_the_same_seed_gives_the_same_verdict() -> None:
    y = np.random.default_rng(3).normal(size=300)
    close = Outputs(y + np.random.default_rng(4).normal(scale=0.1, size=300))
    far = Outputs(y + np.random.default_rng(5).normal(scale=0.5, size=300))
    config = ReleaseConfig()
    assert judge(config, "regression", y, close, far).passed
    assert not judge(config, "regression", y, far, close).passed
    first, again = judge(config, "regression", y, close, far), judge(config, "regression", y, close, far)
    assert first.to_dict() == again.to_dict()
    assert first.metric == "rmse"


def test_log_loss_compares_probabilities() -> None:
    sure = np.where(Y[:, None] == np.arange(2), 0.9, 0.1)
    unsure = np.where(Y[:, None] == np.arange(2), 0.6, 0.4)
    config = ReleaseConfig(metric="log_loss")
    verdict = judge(config, "classification", Y, Outputs(Y, sure), Outputs(Y, unsure))
    assert verdict.passed
    assert verdict.comparison is not None
    assert verdict.comparison.candidate == pytest.approx(-np.log(0.9))


def test_paired_resampling_sees_what_two_independent_ones_would_not() -> None:
    # The candidate is right on every row production is right on, and on 8 more: paired, every
    # resample shows the gain; the interval stays above zero.
    y = np.ones(400)
    production = (np.arange(400) >= 100).astype(float)
    candidate = (np.arange(400) >= 92).astype(float)
    comparison = paired_bootstrap(
        "accuracy", "max", candidate == y, production == y, resamples=500, confidence=0.95, seed=0
    )
    assert comparison.low > 0


def test_a_first_release_is_judged_on_the_thresholds_alone() -> None:
    candidate = labels_with_errors(Y, 40, 1)
    verdict = judge(ReleaseConfig(), "classification", Y, candidate, None)
    assert verdict.passed and verdict.first_release and verdict.comparison is None
    assert "no production version yet" in verdict.summary()
    low = judge(ReleaseConfig(threshold=0.95), "classification", Y, candidate, None)
    assert not low.passed
    assert "accuracy 0.9000 (must be at least 0.95)" in low.failures[0]


def test_latency_and_size_bounds_are_checks_with_their_evidence() -> None:
    candidate = labels_with_errors(Y, 10, 1)
    config = ReleaseConfig(max_latency_ms=5, max_size_mb=1)
    verdict = judge(config, "classification", Y, candidate, None, latency_ms=12.0, size_mb=0.5)
    assert [check.name for check in verdict.checks if not check.passed] == ["latency"]
    assert verdict.to_dict()["measured"] == {"latency_ms": 12.0, "size_mb": 0.5}


def test_a_debugger_rule_with_action_fail_stops_the_release() -> None:
    candidate, production = labels_with_errors(Y, 20, 1), labels_with_errors(Y, 80, 2)
    clean = judge(ReleaseConfig(), "classification", Y, candidate, production, failed_rules=[])
    assert clean.passed and clean.checks[-1].detail == "no debugger rule with action fail fired in training"
    fired = ["overfitting at step 40 (epoch 5): valid_loss rose 3 epochs while train_loss fell"]
    verdict = judge(ReleaseConfig(), "classification", Y, candidate, production, failed_rules=fired)
    assert not verdict.passed
    assert verdict.failures == [f"debugger rules with action fail fired: {fired[0]}"]


def test_a_metric_of_another_task_and_an_empty_split_are_refused() -> None:
    with pytest.raises(UserError, match=r"release.metric: 'rmse' is not a metric of a classification model"):
        judge(ReleaseConfig(metric="rmse"), "classification", Y, Outputs(Y), None)
    with pytest.raises(UserError, match="the test split has no rows"):
        judge(ReleaseConfig(), "classification", Y[:0], Outputs(Y[:0]), None)


@pytest.fixture
def registry(tmp_path: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("churn")
    for _ in range(3):
        client.create_model_version("churn", source=str(tmp_path / "model"))
    return client


def test_promotions_and_rollbacks_are_a_history_that_only_grows(registry: mlflow.MlflowClient) -> None:
    for version in ("1", "2", "3"):
        move_alias(registry, "churn", "production", version, f"release {version}")
    assert current_version(registry, "churn", "production") == "3"
    again = move_alias(registry, "churn", "production", "3", "a resumed step promotes again")
    assert again.previous == "3" and len(alias_history(registry, "churn", "production")) == 3  # no move
    back = rollback(registry, "churn", "production", "v3 misbehaves")
    assert (back.version, back.previous, back.kind) == ("2", "3", "rollback")
    assert rollback(registry, "churn", "production", "v2 too").version == "1"  # a second goes further
    with pytest.raises(UserError, match="nothing to roll back to; only version 1 has held it"):
        rollback(registry, "churn", "production", "again")
    history = alias_history(registry, "churn", "production")
    assert [(m.version, m.kind) for m in history] == [
        ("1", "promote"), ("2", "promote"), ("3", "promote"), ("2", "rollback"), ("1", "rollback"),
    ]  # fmt: skip
    assert history[3].reason == "v3 misbehaves" and history[3].previous == "3"
    assert registry.get_model_version("churn", "1").tags["raylens.production.reason"] == "v2 too"
    assert alias_history(registry, "churn", "staging") == []


def test_a_bad_move_is_refused_and_moves_nothing(registry: mlflow.MlflowClient) -> None:
    move_alias(registry, "churn", "production", "1", "first")
    before = dict(registry.get_registered_model("churn").tags)
    with pytest.raises(UserError, match="has no version 7; it has: 1, 2, 3"):
        move_alias(registry, "churn", "production", "7", "typo")
    with pytest.raises(UserError, match="no registered model 'chrun' \\(did you mean 'churn'\\?\\)"):
        move_alias(registry, "chrun", "production", "2", "typo")
    with pytest.raises(UserError, match="say why the alias moves"):
        move_alias(registry, "churn", "production", "2", "  ")
    assert dict(registry.get_registered_model("churn").tags) == before
    assert current_version(registry, "churn", "production") == "1"
