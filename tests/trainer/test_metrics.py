import warnings

import numpy as np
import pytest
from sklearn import metrics as sk

from raylens.trainer.metrics import (
    classification_metrics,
    classification_test_metrics,
    confusion_matrix,
    metric_labels,
    metrics_from_summary,
    regression_metrics,
    reported_metrics,
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
    error in the target's units for regression (not of the standardized target it trains on)."""
    import torch

    from raylens.trainer.loop import Batches, evaluate
    from raylens.trainer.task import TaskSpec

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
    in_units = regressor(torch.from_numpy(x)).detach().numpy().ravel() * 2.0 + 5.0
    assert ours["loss"] == pytest.approx(sk.mean_squared_error(target, in_units), rel=1e-5)
    assert ours["loss"] == pytest.approx(ours["rmse"] ** 2, rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_binary_validation_precision_and_recall_are_scikit_learns_of_the_second_class(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = (rng.random(300) < 0.3).astype(np.int64)
    y_pred = np.where(rng.random(300) < 0.8, y_true, 1 - y_true)
    ours = classification_metrics(y_true, y_pred, num_classes=2)
    assert ours["precision"] == pytest.approx(sk.precision_score(y_true, y_pred, pos_label=1))
    assert ours["recall"] == pytest.approx(sk.recall_score(y_true, y_pred, pos_label=1))
    never = classification_metrics(y_true, np.zeros_like(y_true), num_classes=2)  # 0/0 precision
    assert never["precision"] == sk.precision_score(y_true, np.zeros_like(y_true), zero_division=0) == 0.0
    assert "precision" not in classification_metrics(y_true, y_pred, num_classes=3)


def test_a_sweep_may_optimize_binary_precision_and_recall_only_for_two_classes() -> None:
    binary, multi = reported_metrics("classification", 2), reported_metrics("classification", 3)
    assert {"valid_precision", "valid_recall"} <= set(binary)
    assert not {"valid_precision", "valid_recall"} & set(multi)
    assert reported_metrics("classification") == multi  # what every classification reports
    assert reported_metrics("regression", 1) == reported_metrics("regression")


def test_the_weighted_loss_is_torchs_weighted_cross_entropy_also_summed_over_shards() -> None:
    """With class weights the loss averages over the rows' weights, as
    ``F.cross_entropy(weight=...)``: shards summarized apart (as DDP ranks) add up to the whole."""
    import torch
    import torch.nn.functional as F

    from raylens.trainer.loop import Batches, evaluate
    from raylens.trainer.outputs import loss_fn
    from raylens.trainer.task import TaskSpec

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(90, 4)).astype(np.float32), rng.integers(0, 3, 90)
    torch.manual_seed(0)  # a fixed model: whether the weights change its loss must not be luck
    model = torch.nn.Linear(4, 3)
    task = TaskSpec("classification", num_classes=3, class_weights=(0.5, 2.0, 7.0))
    logits = model(torch.from_numpy(x)).detach()
    expected = float(F.cross_entropy(logits, torch.from_numpy(y), weight=torch.tensor([0.5, 2.0, 7.0])))
    unweighted = float(F.cross_entropy(logits, torch.from_numpy(y)))
    assert float(loss_fn(logits, torch.from_numpy(y), task)) == pytest.approx(expected, rel=1e-6)
    assert evaluate(model, Batches.from_numpy(x, y), task)["loss"] == pytest.approx(expected, rel=1e-6)
    assert abs(expected - unweighted) > 0.05, "weights that change nothing prove nothing"

    summaries: list[np.ndarray] = []

    def keep(summary: np.ndarray) -> np.ndarray:  # what DDP's all-reduce would receive from a rank
        summaries.append(summary)
        return summary

    for rows in np.array_split(np.arange(90), 3):
        evaluate(model, Batches.from_numpy(x[rows], y[rows]), task, combine=keep)
    whole = metrics_from_summary(sum(summaries), "classification", 3)
    assert whole["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_test_metrics_are_scikit_learns_on_the_same_probabilities(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(200, 2)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = (rng.random(200) < probabilities[:, 1]).astype(np.int64)
    overall, per_class = classification_test_metrics(y, probabilities, ["no", "yes"])
    predicted = probabilities.argmax(axis=1)
    assert per_class == {}
    assert overall == pytest.approx(
        {
            "roc_auc": sk.roc_auc_score(y, probabilities[:, 1]),
            "pr_auc": sk.average_precision_score(y, probabilities[:, 1]),
            "precision": sk.precision_score(y, predicted),
            "recall": sk.recall_score(y, predicted),
            "f1": sk.f1_score(y, predicted),
            "log_loss": sk.log_loss(y, probabilities),
        }
    )

    logits = rng.normal(size=(300, 4)) * 2
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(4, p=p) for p in probabilities])
    y[y == 3] = 2  # class 3 never occurs: its scores are 0, and the log loss still knows 4 classes
    overall, per_class = classification_test_metrics(y, probabilities, ["a", "b c", "d/e", 3])
    predicted = probabilities.argmax(axis=1)
    precision, recall, _, _ = sk.precision_recall_fscore_support(
        y, predicted, labels=[0, 1, 2, 3], zero_division=0
    )
    assert overall == pytest.approx({"log_loss": sk.log_loss(y, probabilities, labels=[0, 1, 2, 3])})
    assert per_class == pytest.approx(
        {
            **{f"precision_{name}": p for name, p in zip(["a", "b_c", "d_e", "3"], precision, strict=True)},
            **{f"recall_{name}": r for name, r in zip(["a", "b_c", "d_e", "3"], recall, strict=True)},
        }
    )


def test_a_test_set_of_one_class_leaves_out_what_it_cannot_define_without_a_warning() -> None:
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's "only one class" warnings would fail here
        negatives, _ = classification_test_metrics(np.zeros(3, np.int64), probabilities, [0, 1])
        positives, _ = classification_test_metrics(np.ones(3, np.int64), probabilities, [0, 1])
    assert "roc_auc" not in negatives and "pr_auc" not in negatives  # no positive row
    assert "roc_auc" not in positives and positives["pr_auc"] == 1.0
    assert negatives["log_loss"] == pytest.approx(sk.log_loss([0, 0, 0], probabilities, labels=[0, 1]))
    assert negatives["precision"] == 0.0 and positives["recall"] == pytest.approx(1 / 3)


def test_class_labels_become_metric_names_mlflow_accepts() -> None:
    from mlflow.utils.validation import _validate_metric_name

    labels = metric_labels(["setosa flower", "a/b", "../up", "naïve", True, 2.5, "a b"])
    assert labels == ["setosa_flower", "a_b_1", ".._up", "na_ve", "True", "2.5", "a_b_6"]
    for label in labels:
        _validate_metric_name(f"test_precision_{label}")
