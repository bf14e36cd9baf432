import numpy as np
import pytest
from sklearn import metrics as sk

from raylens.trainer.metrics import (
    classification_metrics,
    confusion_matrix,
    metrics_from_summary,
    regression_metrics,
    summarize,
)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))  # class 4 never predicted
    ours = classification_metrics(y_true, y_pred, num_classes=6)  # class 5 never occurs
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert ours["f1_macro"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert np.array_equal(
        confusion_matrix(y_true, y_pred, 6), sk.confusion_matrix(y_true, y_pred, labels=range(6))
    )


@pytest.mark.parametrize("seed", range(5))
def test_regression_metrics_match_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.normal(10, 3, 300)
    y_pred = y_true + rng.normal(0, 1, 300)
    ours = regression_metrics(y_true, y_pred)
    assert ours["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(y_true, y_pred)))
    assert ours["mae"] == pytest.approx(sk.mean_absolute_error(y_true, y_pred))
    assert ours["r2"] == pytest.approx(sk.r2_score(y_true, y_pred))


def test_constant_target_r2_follows_scikit_learn() -> None:
    y = np.ones(5)
    assert regression_metrics(y, y)["r2"] == sk.r2_score(y, y)
    assert regression_metrics(y, y + 1)["r2"] == sk.r2_score(y, y + 1)


@pytest.mark.parametrize("offset", [0.0, 1e6, -3e7])
def test_r2_of_a_target_far_from_zero_matches_scikit_learn_in_shards(offset: float) -> None:
    """Two shards summarized apart and added (as ranks all-reduce them), around a shift that is
    only near the mean (the training mean), give scikit-learn's R² on the whole."""
    rng = np.random.default_rng(0)
    y_true = offset + rng.normal(0, 0.5, 400)
    y_pred = y_true + rng.normal(0.3, 1.0, 400)
    shift = offset + 0.2
    halves = [
        summarize(t, p, 0.0, "regression", 0, shift)
        for t, p in zip(np.array_split(y_true, 2), np.array_split(y_pred, 2), strict=True)
    ]
    ours = metrics_from_summary(sum(halves), "regression", 0)
    assert ours["r2"] == pytest.approx(sk.r2_score(y_true, y_pred), abs=1e-6)
    assert ours["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(y_true, y_pred)), abs=1e-6)
    assert regression_metrics(y_true, y_pred)["r2"] == pytest.approx(sk.r2_score(y_true, y_pred), abs=1e-6)


def test_the_reported_losses_are_scikit_learns() -> None:
    """The loss a run reports: cross-entropy of the softmax for classification, mean squared
    error (of the standardized target) for regression."""
    import torch

    from raylens.trainer.loop import Batches, TaskSpec, evaluate

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 3)).astype(np.float32), rng.integers(0, 3, 64)
    model = torch.nn.Linear(3, 3)
    ours = evaluate(model, Batches.from_numpy(x, y), TaskSpec("classification", num_classes=3))
    probabilities = torch.softmax(model(torch.from_numpy(x)), dim=1).detach().numpy()
    assert ours["loss"] == pytest.approx(sk.log_loss(y, probabilities, labels=[0, 1, 2]), rel=1e-5)

    target = rng.normal(5, 2, 64).astype(np.float32)
    regressor = torch.nn.Linear(3, 1)
    task = TaskSpec("regression", target_mean=5.0, target_std=2.0)
    ours = evaluate(regressor, Batches.from_numpy(x, target), task)
    standardized = regressor(torch.from_numpy(x)).detach().numpy().ravel()
    assert ours["loss"] == pytest.approx(sk.mean_squared_error((target - 5.0) / 2.0, standardized), rel=1e-5)
    assert ours["rmse"] == pytest.approx(
        np.sqrt(sk.mean_squared_error(target, standardized * 2.0 + 5.0)), rel=1e-5
    )
