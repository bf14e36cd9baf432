"""The sklearn family: every built-in estimator on both tasks, stages a scheduler can stop, the
registered model on raw columns, and mistakes refused before anything is fitted."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier

from raylens.errors import UserError
from raylens.features import FeatureSet, invert_all, transforms_from_dicts
from raylens.storage import Location
from raylens.trainer import SklearnModelConfig, TrainConfig, TrainJob, parse_model_config
from raylens.trainer.config import BUILTIN_ESTIMATORS
from raylens.trainer.family import TrainingFailed, family_of
from raylens.trainer.metrics import reported_metrics
from raylens.trainer.run import train_and_record
from raylens.trainer.sklearn_family import BUILTIN, SklearnPredictor, build_estimator, fit_in_stages
from raylens.trainer.tracking import MlflowTracker, NullTracker
from tests.trainer.test_classification import bundled

SKLEARN = family_of("sklearn")


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    return bundled("breast_cancer", tmp_path_factory.mktemp("cancer"))


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    return bundled("diabetes", tmp_path_factory.mktemp("diabetes"))


def job_of(fs: FeatureSet, name: str, epochs: int = 3, **params: Any) -> TrainJob:
    return TrainJob.for_feature_set(
        SklearnModelConfig(name=name, params=params), TrainConfig(epochs=epochs), fs
    )


def fitted(job: TrainJob, fs: FeatureSet) -> tuple[Any, list[dict[str, float]]]:
    reports: list[dict[str, float]] = []
    estimator = build_estimator(job.model, job.task.kind, seed=job.train.seed)  # type: ignore[arg-type]
    fit_in_stages(estimator, job, fs.read("train"), fs.read("valid"), lambda m, _: reports.append(m))
    return estimator, reports


@pytest.mark.parametrize("name", BUILTIN_ESTIMATORS)
def test_every_builtin_reports_the_metrics_a_torch_model_reports(
    name: str, cancer: FeatureSet, diabetes: FeatureSet
) -> None:
    for fs in (cancer, diabetes):
        kind = fs.task
        if BUILTIN[name][0 if kind == "classification" else 1] is None:
            with pytest.raises(UserError, match=f"does not fit a {kind}"):
                fitted(job_of(fs, name), fs)
            continue
        job = job_of(fs, name)
        estimator, reports = fitted(job, fs)
        expected = set(reported_metrics(kind, fs.num_outputs if kind == "classification" else None))
        assert set(reports[-1]) == expected, name
        predictor = SklearnPredictor(estimator, job.task)
        valid = fs.read("valid")
        if kind == "classification":
            probabilities = predictor.predict_proba(valid.x)
            assert probabilities.shape == (len(valid), fs.num_outputs)
            assert probabilities.sum(axis=1) == pytest.approx(1.0)
            assert reports[-1]["valid_accuracy"] > 0.85, name
        else:
            assert reports[-1]["valid_r2"] > 0.1, name
            rmse = np.sqrt(np.mean((predictor.predict(valid.x) - valid.y) ** 2))
            assert reports[-1]["valid_rmse"] == pytest.approx(rmse, rel=1e-9)


def test_an_ensemble_grows_in_stages_into_the_forest_fitted_at_once(cancer: FeatureSet) -> None:
    """Warm-started stages a scheduler can stop between, and the same model at the end."""
    job = job_of(cancer, "random_forest", epochs=4, n_estimators=20, max_depth=4)
    staged, reports = fitted(job, cancer)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    assert len(staged.estimators_) == 20
    at_once = RandomForestClassifier(n_estimators=20, max_depth=4, random_state=0).fit(*_xy(cancer))
    test = cancer.read("test")
    assert np.array_equal(staged.predict_proba(test.x), at_once.predict_proba(test.x))


def _xy(fs: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    train = fs.read("train")
    return train.x, train.y


@pytest.mark.parametrize(("name", "params"), [("hist_gradient_boosting", {"max_iter": 12}), ("sgd", {})])
def test_iterative_estimators_report_every_stage(
    name: str, params: dict[str, Any], cancer: FeatureSet
) -> None:
    _, reports = fitted(job_of(cancer, name, epochs=4, **params), cancer)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]


def test_early_stopping_ends_the_stages(cancer: FeatureSet) -> None:
    train = TrainConfig(epochs=10, early_stopping={"metric": "valid_accuracy", "mode": "max", "patience": 1})
    job = TrainJob.for_feature_set(SklearnModelConfig(name="knn"), train, cancer)
    _, once = fitted(job, cancer)
    assert len(once) == 1  # knn is fitted once: one report
    forest = TrainJob.for_feature_set(
        SklearnModelConfig(name="random_forest", params={"n_estimators": 200, "min_samples_leaf": 50}),
        train,
        cancer,
    )
    _, reports = fitted(forest, cancer)
    assert 2 <= len(reports) < 10


def test_a_trial_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(
    cancer: FeatureSet, tmp_path: Path
) -> None:
    job = job_of(cancer, "random_forest", epochs=4, n_estimators=16)
    train, valid = cancer.read("train"), cancer.read("valid")
    whole: list[dict[str, float]] = []
    SKLEARN.run_trial(job, train, valid, lambda m, folder: whole.append(m), None)

    class Stop(Exception):
        pass

    kept = tmp_path / "checkpoint"

    def stop_after_two(metrics: dict[str, float], folder: Path | None) -> None:
        assert folder is not None
        if metrics["epoch"] == 2:
            import shutil

            shutil.copytree(folder, kept)
            raise Stop

    with pytest.raises(Stop):
        SKLEARN.run_trial(job, train, valid, stop_after_two, None)
    resumed: list[dict[str, float]] = []
    SKLEARN.run_trial(job, train, valid, lambda m, folder: resumed.append(m), kept)
    assert [r["epoch"] for r in resumed] == [3, 4]
    assert resumed[-1]["valid_loss"] == whole[-1]["valid_loss"]


def test_a_trial_imports_neither_torch_nor_the_sweep(cancer: FeatureSet, tmp_path: Path) -> None:
    """A sweep's trial process unpickles its job and arrays, imports the trial's module and its
    family, and fits: torch's second or more of start-up per process (bench sweep) is not paid
    by a scikit-learn trial."""
    job = job_of(cancer, "random_forest", epochs=2, n_estimators=4)
    (tmp_path / "trial.pkl").write_bytes(pickle.dumps((job, cancer.read("train"), cancer.read("valid"))))
    code = (
        "import pickle, sys; import raylens.tuning.trial; from raylens.trainer.family import family_of; "
        f"job, train, valid = pickle.loads(open({str(tmp_path / 'trial.pkl')!r}, 'rb').read()); "
        "reports = []; "
        "family_of(job.model).run_trial(job, train, valid, lambda m, f: reports.append(m), None); "
        "assert [r['epoch'] for r in reports] == [1, 2], reports; "
        "assert 'torch' not in sys.modules and 'raylens.tuning.sweep' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_registered_estimator_predicts_from_raw_columns(
    diabetes: FeatureSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = job_of(diabetes, "hist_gradient_boosting", epochs=3, max_iter=30)
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "sk", tmp_path / "artifacts")
    result = train_and_record(
        job,
        diabetes,
        tracker=tracker,
        run_name="final",
        storage_path=Location.of(tmp_path / "runs"),
        params={},
        tags={},
        register_as="diabetes-hgb",
    )
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.registered_version == "1" and result.model_uri is not None
    run = tracker.client.get_run(result.run_id)
    assert run.data.tags["raylens.model_family"] == "sklearn"
    assert run.data.metrics["test_rmse"] == pytest.approx(result.test_metrics["test_rmse"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    served = mlflow.pyfunc.load_model("models:/diabetes-hgb/1")
    test = diabetes.read("test")
    raw = invert_all(transforms_from_dicts(diabetes.manifest.transforms), test.x, diabetes.feature_columns)
    answer = np.asarray(served.predict(pd.DataFrame(raw, columns=diabetes.feature_columns)), dtype=np.float64)
    fitted_again, _ = fitted(job, diabetes)  # same seed, same model
    assert answer == pytest.approx(fitted_again.predict(test.x), rel=1e-5, abs=1e-4)
    # The same model again is not registered twice.
    again = train_and_record(
        job,
        diabetes,
        tracker=tracker,
        run_name="again",
        storage_path=Location.of(tmp_path / "runs"),
        params={},
        tags={},
        register_as="diabetes-hgb",
    )
    assert (again.registered_version, again.registered_now) == ("1", False)


def test_without_a_tracker_nothing_is_logged(cancer: FeatureSet, tmp_path: Path) -> None:
    result = train_and_record(
        job_of(cancer, "logistic_regression"),
        cancer,
        tracker=NullTracker(),
        run_name="final",
        storage_path=tmp_path,
        params={},
        tags={},
    )
    assert result.model_uri is None and result.test_metrics["test_accuracy"] > 0.9


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name": "random_forest", "params": {"max_dept": 3}}, r"max_dept.*did you mean 'max_depth'"),
        (
            {"name": "sklearn.ensemble:NoSuchForest"},
            r"'sklearn.ensemble' has no estimator class 'NoSuchForest'",
        ),
        ({"name": "no_such_pkg:Model"}, r"cannot import 'no_such_pkg'"),
    ],
)
def test_a_wrong_estimator_or_parameter_is_named(model: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        SKLEARN.check_params(parse_model_config({"family": "sklearn", **model}))


def test_a_value_scikit_learn_refuses_or_the_wrong_kind_of_estimator_is_named(cancer: FeatureSet) -> None:
    rows = cancer.read("train").x[:2]
    with pytest.raises(UserError, match=r"model.params: .*max_depth"):
        SKLEARN.check_on_rows(
            SklearnModelConfig(name="random_forest", params={"max_depth": -1}), rows, "classification", 2
        )
    regressor = SklearnModelConfig(name="sklearn.ensemble:ExtraTreesRegressor")
    with pytest.raises(UserError, match="is not a classifier"):
        SKLEARN.check_on_rows(regressor, rows, "classification", 2)


def test_an_estimator_predicting_what_is_not_a_number_fails_its_run(diabetes: FeatureSet) -> None:
    job = job_of(diabetes, "tests.trainer.user_models:NanRegressor")
    with pytest.raises(TrainingFailed, match="not a finite number"):
        fitted(job, diabetes)
