"""Classification users get what they expect, in-process on scikit-learn's breast cancer set:
the test metrics they look for (scikit-learn's own, on the network's probabilities), class
weights that weigh the training loss as ``F.cross_entropy(weight=...)`` does, and losses reported
in the target's units for a regression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn import metrics as sk
from sklearn.utils.class_weight import compute_class_weight

from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, FeatureSet, build_feature_set
from raylens.trainer import Batches, TorchModelConfig, TrainConfig, TrainJob, TrainState, build_model, fit
from raylens.trainer.job import run_worker
from raylens.trainer.loop import evaluate, predict_proba
from raylens.trainer.metrics import score_test_split
from raylens.trainer.parallel import gather_checkpoint
from raylens.trainer.task import resolve_class_weights
from raylens.trainer.torch_family import TorchPredictor


class KeepLast:
    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        self.metrics = metrics
        self.state = gather_checkpoint(state.model, state.optimizer, state.epoch)


def bundled(name: str, folder: Path) -> FeatureSet:
    return build_feature_set(
        name,
        DataConfig(source=f"sklearn:{name}", target="target", split={"valid": 0.2, "test": 0.25, "seed": 0}),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        folder / "store",
    )


@pytest.fixture
def cancer(tmp_path: Path) -> FeatureSet:
    return bundled("breast_cancer", tmp_path)


def trained(fs: FeatureSet, epochs: int, **train: object) -> tuple[TrainJob, torch.nn.Module, KeepLast]:
    job = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16]}),
        TrainConfig(epochs=epochs, batch_size=32, optimizer={"lr": 0.01}, **train),  # type: ignore[arg-type]
        fs,
    )
    reporter = KeepLast()
    run_worker(job, fs.read("train"), fs.read("valid"), reporter)
    model = build_model(job.model, job.in_features, job.task.out_features)
    model.load_state_dict(reporter.state["model"])
    return job, model, reporter


def test_binary_test_metrics_are_scikit_learns_on_the_networks_probabilities(cancer: FeatureSet) -> None:
    job, model, reporter = trained(cancer, epochs=10)
    assert {"valid_precision", "valid_recall"} <= set(reporter.metrics)
    test = cancer.read("test")
    scores = score_test_split(TorchPredictor(model, job.task), test.x, test.y, job.task, cancer.classes)

    logits = model(torch.from_numpy(test.x)).detach().double()
    probabilities = torch.softmax(logits, dim=1).numpy()
    assert predict_proba(model, torch.from_numpy(test.x), job.task) == pytest.approx(probabilities, abs=1e-12)
    positive, predicted = probabilities[:, 1], probabilities.argmax(axis=1)  # classes [0, 1]: 1
    assert len(set(predicted)) == 2, "a model that predicts one class proves little"
    expected = {
        "test_roc_auc": sk.roc_auc_score(test.y, positive),
        "test_pr_auc": sk.average_precision_score(test.y, positive),
        "test_precision": sk.precision_score(test.y, predicted),
        "test_recall": sk.recall_score(test.y, predicted),
        "test_f1": sk.f1_score(test.y, predicted),
        "test_log_loss": sk.log_loss(test.y, probabilities),
        "test_accuracy": sk.accuracy_score(test.y, predicted),
    }
    assert {k: scores.overall[k] for k in expected} == pytest.approx(expected, rel=1e-9)
    assert scores.overall["test_roc_auc"] > 0.9  # it learned: a constant model scores 0.5
    assert scores.per_class == {}
    assert scores.confusion is not None
    assert scores.confusion.tolist() == sk.confusion_matrix(test.y, predicted).tolist()


def test_multi_class_test_metrics_are_per_class_and_named_as_mlflow_accepts(tmp_path: Path) -> None:
    wine = bundled("wine", tmp_path)
    job, model, _ = trained(wine, epochs=10)
    test = wine.read("test")
    scores = score_test_split(TorchPredictor(model, job.task), test.x, test.y, job.task, wine.classes)
    probabilities = predict_proba(model, torch.from_numpy(test.x), job.task)
    predicted = probabilities.argmax(axis=1)
    precision, recall, _, _ = sk.precision_recall_fscore_support(
        test.y, predicted, labels=[0, 1, 2], zero_division=0
    )
    assert scores.per_class == pytest.approx(
        {
            **{f"test_precision_{c}": p for c, p in zip(wine.classes or [], precision, strict=True)},
            **{f"test_recall_{c}": r for c, r in zip(wine.classes or [], recall, strict=True)},
        }
    )
    assert scores.overall["test_log_loss"] == pytest.approx(
        sk.log_loss(test.y, probabilities, labels=[0, 1, 2])
    )
    assert not {"test_roc_auc", "test_precision", "test_precision_0"} & set(scores.overall)


def test_balanced_and_explicit_class_weights_resolve_to_one_weight_per_class(cancer: FeatureSet) -> None:
    labels = cancer.read("train").y
    balanced = resolve_class_weights("balanced", cancer.classes, labels)
    assert balanced == pytest.approx(tuple(compute_class_weight("balanced", classes=np.arange(2), y=labels)))
    assert balanced[0] > 1 > balanced[1]  # malignant (0) is the rarer class

    # YAML gives integer keys for integer labels; they match the classes by str(label).
    spec = yaml.safe_load("epochs: 1\nclass_weights:\n  1: 3.5\n")
    config = TrainConfig(**spec)
    assert resolve_class_weights(config.class_weights, cancer.classes, labels) == (1.0, 3.5)
    assert TrainJob.for_feature_set(TorchModelConfig(), config, cancer).task.class_weights == (1.0, 3.5)
    assert TrainJob.for_feature_set(TorchModelConfig(), TrainConfig(), cancer).task.class_weights == ()

    with pytest.raises(UserError) as unknown:
        resolve_class_weights({"2": 1.0}, cancer.classes, labels)
    assert str(unknown.value) == (
        "train.class_weights: '2' is not a class of this feature set; its classes are '0', '1'"
    )
    with pytest.raises(UserError, match=r"class weights apply to classification.*regression"):
        resolve_class_weights("balanced", None, np.empty(0))
    with pytest.raises(ValueError, match="weight of class 1 must be a number > 0"):
        TrainConfig(class_weights={1: 0})


def test_class_weights_weigh_the_training_loss_as_torchs_cross_entropy(cancer: FeatureSet) -> None:
    """With a learning rate of 0 the model stays as it started: the epoch's reported train loss is
    then exactly the weighted cross-entropy of the whole training split, however it was batched."""
    train = cancer.read("train")
    job = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [8]}), TrainConfig(class_weights="balanced"), cancer
    )
    torch.manual_seed(0)
    model = build_model(job.model, job.in_features, job.task.out_features)
    logits = model(torch.from_numpy(train.x)).detach()
    weight = torch.tensor(job.task.class_weights)
    weighted = float(F.cross_entropy(logits, torch.from_numpy(train.y), weight=weight))
    assert abs(weighted - float(F.cross_entropy(logits, torch.from_numpy(train.y)))) > 1e-3

    reporter = KeepLast()
    valid = cancer.read("valid")
    valid_batches = Batches.from_numpy(valid.x, valid.y)
    fit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        Batches.from_numpy(train.x, train.y),
        job.task,
        epochs=1,
        batch_size=50,  # batches of unequal weight: each step's mean must be summed back by weight
        seed=0,
        reporter=reporter,
        validate=lambda: evaluate(model, valid_batches, job.task),
    )
    assert reporter.metrics["train_loss"] == pytest.approx(weighted, rel=1e-6)
    valid_logits = model(torch.from_numpy(valid.x)).detach()
    assert reporter.metrics["valid_loss"] == pytest.approx(
        float(F.cross_entropy(valid_logits, torch.from_numpy(valid.y), weight=weight)), rel=1e-6
    )
    # The test log loss is scikit-learn's, unweighted, whatever the training weighed.
    test = cancer.read("test")
    scores = score_test_split(TorchPredictor(model, job.task), test.x, test.y, job.task, cancer.classes)
    probabilities = predict_proba(model, torch.from_numpy(test.x), job.task)
    assert scores.overall["test_log_loss"] == pytest.approx(sk.log_loss(test.y, probabilities))
    assert scores.overall["test_loss"] != pytest.approx(scores.overall["test_log_loss"])


def test_class_weights_on_a_regression_are_refused(tmp_path: Path) -> None:
    diabetes = bundled("diabetes", tmp_path)
    with pytest.raises(UserError, match=r"remove train\.class_weights"):
        TrainJob.for_feature_set(TorchModelConfig(), TrainConfig(class_weights={"1": 2.0}), diabetes)


def test_the_regression_train_loss_is_the_mse_in_the_targets_units(tmp_path: Path) -> None:
    diabetes = bundled("diabetes", tmp_path)
    train = diabetes.read("train")
    job = TrainJob.for_feature_set(TorchModelConfig(params={"hidden": [8]}), TrainConfig(), diabetes)
    assert job.task.target_std > 50  # the diabetes target spreads over hundreds: units matter
    torch.manual_seed(0)
    model = build_model(job.model, job.in_features, job.task.out_features)
    reporter = KeepLast()
    fit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        Batches.from_numpy(train.x, train.y),
        job.task,
        epochs=1,
        batch_size=64,
        seed=0,
        reporter=reporter,
    )
    standardized = model(torch.from_numpy(train.x)).detach().double().squeeze(-1).numpy()
    in_units = standardized * job.task.target_std + job.task.target_mean
    assert reporter.metrics["train_loss"] == pytest.approx(sk.mean_squared_error(train.y, in_units), rel=1e-5)
