"""The sklearn family: scikit-learn estimators fitted in one process on the feature set's splits.

An estimator is named by a short built-in name, which picks the classifier or regressor the task
needs (``BUILTIN``), or as ``"package.module:Class"``. It is fitted on the same training split,
scored on the same validation split with the same metrics as a torch model, and registered as
the same pyfunc model (the fitted feature transforms applied first).

*Stages*: an iterative estimator is fitted in ``train.epochs`` stages, each reported as an epoch
with its validation metrics, so a sweep's scheduler can stop it early: an ensemble grows its
``n_estimators`` (``max_iter`` of histogram gradient boosting) by warm start; an estimator that
takes ``warm_start`` and ``max_iter`` goes on from its last coefficients for another share of
``max_iter``; one with ``partial_fit`` only takes one pass per stage. Any other estimator is
fitted once, reported as epoch 1.
"""

from __future__ import annotations

import inspect
import io
import json
import math
import pickle
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raylens.errors import UserError, did_you_mean
from raylens.trainer.config import AnyModelConfig, SklearnModelConfig
from raylens.trainer.decisions import Action
from raylens.trainer.family import (
    ModelFiles,
    Trained,
    TrainingFailed,
    TrainJob,
    TrialReport,
    import_named,
    user_code,
)
from raylens.trainer.metrics import predicted_metrics
from raylens.trainer.monitors import EarlyStopping
from raylens.trainer.task import TaskSpec

if TYPE_CHECKING:
    from raylens.features import FeatureSet, SplitArrays
    from raylens.storage import Location

ESTIMATOR = "estimator"
STATE_FILE = "estimator.pkl"
PROGRESS_FILE = "stage.json"

BUILTIN: dict[str, tuple[str | None, str | None]] = {
    "logistic_regression": ("sklearn.linear_model:LogisticRegression", None),
    "linear_regression": (None, "sklearn.linear_model:LinearRegression"),
    "random_forest": ("sklearn.ensemble:RandomForestClassifier", "sklearn.ensemble:RandomForestRegressor"),
    "hist_gradient_boosting": (
        "sklearn.ensemble:HistGradientBoostingClassifier",
        "sklearn.ensemble:HistGradientBoostingRegressor",
    ),
    "svm": ("sklearn.svm:SVC", "sklearn.svm:SVR"),
    "knn": ("sklearn.neighbors:KNeighborsClassifier", "sklearn.neighbors:KNeighborsRegressor"),
    "sgd": ("sklearn.linear_model:SGDClassifier", "sklearn.linear_model:SGDRegressor"),
}
"""Short name → (classifier, regressor) as "module:Class"; None where the task has none."""

DEFAULTS: dict[str, dict[str, Any]] = {
    "sklearn.linear_model:LogisticRegression": {"max_iter": 1000},
    "sklearn.linear_model:SGDClassifier": {"loss": "log_loss"},
}
"""Parameters a built-in starts from (a spec's params win): what makes it score like the others."""

IGNORES_N_JOBS = {"sklearn.linear_model:LogisticRegression"}
"""Estimators that take n_jobs but warn that it has no effect (scikit-learn 1.8 on)."""

KINDS = {"classification": 0, "regression": 1}


def _sklearn_config(config: AnyModelConfig) -> SklearnModelConfig:
    assert isinstance(config, SklearnModelConfig), f"the sklearn family got a {config.family} model"
    return config


def estimator_path(config: SklearnModelConfig, task: str) -> str:
    """The "module:Class" of the estimator the config names for ``task``."""
    if config.name not in BUILTIN:
        return config.name
    path = BUILTIN[config.name][KINDS[task]]
    if path is None:
        other = "linear_regression" if task == "regression" else "logistic_regression"
        raise UserError(
            f"model.name: {config.name} does not fit a {task} (the feature set's task); use {other}, "
            f"or one of {', '.join(n for n, pair in BUILTIN.items() if pair[KINDS[task]])}"
        )
    return path


def estimator_class(path: str) -> type:
    cls = import_named(path)
    module_name, _, attr = path.partition(":")
    if not isinstance(cls, type) or not callable(getattr(cls, "fit", None)):
        raise UserError(
            f"model.name: '{module_name}' has no estimator class '{attr}' (a class with fit, as "
            "scikit-learn's); e.g. sklearn.ensemble:ExtraTreesClassifier"
        )
    return cls


def _accepted(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls).parameters if n not in ("args", "kwargs")]


def build_estimator(
    config: SklearnModelConfig, task: str, *, seed: int = 0, threads: int | None = None
) -> Any:
    """The estimator of ``config`` for ``task``, with ``random_state`` from the seed and
    ``n_jobs`` from the threads where it takes them and the spec does not set them; its
    parameters checked by scikit-learn's own rules."""
    path = estimator_path(config, task)
    cls = estimator_class(path)
    _check_keys(config, [cls])
    from sklearn.base import is_classifier, is_regressor

    settings = {**DEFAULTS.get(path, {}), **config.params}
    accepted = _accepted(cls)
    if "random_state" in accepted:
        settings.setdefault("random_state", seed)
    if "n_jobs" in accepted and threads is not None and path not in IGNORES_N_JOBS:
        settings.setdefault("n_jobs", threads)
    try:
        estimator = cls(**settings)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model: cannot build '{config.name}' with params {config.params}: {exc}") from None
    wrong = (task == "classification" and not is_classifier(estimator)) or (
        task == "regression" and not is_regressor(estimator)
    )
    if wrong:
        needed = "classifier" if task == "classification" else "regressor"
        raise UserError(
            f"model.name: {path} is not a {needed}, and the feature set's task is {task}; name a {needed}"
        )
    validate = getattr(estimator, "_validate_params", None)
    if callable(validate) and hasattr(estimator, "_parameter_constraints"):  # checked without fitting
        try:
            validate()
        except (TypeError, ValueError) as exc:
            raise UserError(f"model.params: {exc}; fix model.params") from None
    if path == "sklearn.svm:SVC" and "probability" not in config.params:
        # Class probabilities (the log loss, ROC-AUC) as scikit-learn now advises: Platt scaling
        # by cross-validation, one SVC kept (what SVC(probability=True) did).
        from sklearn.calibration import CalibratedClassifierCV

        return CalibratedClassifierCV(estimator, ensemble=False)
    return estimator


def _check_keys(config: SklearnModelConfig, classes: list[type]) -> None:
    known = sorted({name for cls in classes for name in _accepted(cls)})
    for key in config.params:
        if key not in known:
            raise UserError(
                f"model.params.{key}: '{config.name}' takes no parameter '{key}'{did_you_mean(key, known)}; "
                f"it takes: {', '.join(known)}"
            )


class SklearnPredictor:
    """A fitted estimator: class probabilities over every class of the feature set (a class the
    training split lacked gets 0), predictions decoded as the task says."""

    def __init__(self, estimator: Any, task: TaskSpec) -> None:
        self.estimator, self.task = estimator, task

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.task.kind != "classification":
            raise ValueError("class probabilities need a classification task")
        out = np.zeros((len(x), self.task.num_classes), dtype=np.float64)
        columns = np.asarray(self.estimator.classes_, dtype=np.int64)
        if hasattr(self.estimator, "predict_proba"):
            out[:, columns] = self.estimator.predict_proba(x)
            # Estimators fed float32 rows may answer in float32: each row made to sum to 1 again.
            out /= out.sum(axis=1, keepdims=True)
        else:  # an estimator without probabilities: all of it on the predicted class
            out[np.arange(len(x)), np.asarray(self.estimator.predict(x), dtype=np.int64)] = 1.0
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.task.kind == "classification":
            return self.predict_proba(x).argmax(axis=1)
        return np.asarray(self.estimator.predict(x), dtype=np.float64)


@dataclass(frozen=True)
class Stages:
    """How an estimator is fitted in stages: ``count`` of them, by ``how``."""

    how: str
    """grow: a warm-started ensemble whose ``param`` grows to its total; step: warm start for
    another share of ``param`` iterations; partial: one ``partial_fit`` pass; once: one fit."""
    count: int
    param: str = ""
    total: int = 0

    def size(self, stage: int) -> int:
        """``param`` at ``stage`` (1-based): the ensemble's size so far, or this stage's iterations."""
        if self.how == "grow":
            return math.ceil(stage * self.total / self.count)
        return math.ceil(stage * self.total / self.count) - math.ceil((stage - 1) * self.total / self.count)


def stages_of(estimator: Any, epochs: int) -> Stages:
    params = estimator.get_params()
    if "warm_start" in params:
        if "n_estimators" in params:
            return Stages(
                "grow", min(epochs, int(params["n_estimators"])), "n_estimators", params["n_estimators"]
            )
        if "max_iter" in params and type(estimator).__name__.startswith("HistGradientBoosting"):
            return Stages("grow", min(epochs, int(params["max_iter"])), "max_iter", params["max_iter"])
        if isinstance(params.get("max_iter"), int):
            return Stages("step", min(epochs, params["max_iter"]), "max_iter", params["max_iter"])
    if callable(getattr(estimator, "partial_fit", None)):
        return Stages("partial", epochs)
    return Stages("once", 1)


def fit_in_stages(
    estimator: Any,
    job: TrainJob,
    train: SplitArrays,
    valid: SplitArrays,
    on_stage: Callable[[dict[str, float], Any], None],
    *,
    start: int = 0,
    stages: Stages | None = None,
) -> Any:
    """Fit ``estimator`` stage by stage from stage ``start``, reporting each stage's metrics (named
    as the torch loop's: epoch, train_loss, train_samples_per_s, valid_...) with the estimator;
    a monitor's verdict (early stopping, a loss that is not finite) acts as in the loop.
    ``stages``: those of the estimator as built (a resumed one holds its size so far)."""
    task = job.task
    stages = stages or stages_of(estimator, job.train.epochs)
    weights = np.asarray(task.class_weights)[train.y] if task.class_weights else None
    fit_kwargs = {"sample_weight": weights} if weights is not None else {}
    if weights is not None and "sample_weight" not in inspect.signature(estimator.fit).parameters:
        raise UserError(
            f"train.class_weights: {type(estimator).__name__} takes no sample weights; remove "
            "train.class_weights, or pick an estimator that takes them"
        )
    stopping = EarlyStopping(job.train.early_stopping) if job.train.early_stopping is not None else None
    order = np.random.default_rng(job.train.seed)
    predictor = SklearnPredictor(estimator, task)
    for stage in range(start + 1, stages.count + 1):
        began = time.perf_counter()
        with warnings.catch_warnings():
            # Each stage stops at its share of max_iter by design: not a failure to converge.
            from sklearn.exceptions import ConvergenceWarning

            warnings.simplefilter("ignore", ConvergenceWarning)
            if stages.how in ("grow", "step"):
                estimator.set_params(warm_start=stage > 1, **{stages.param: stages.size(stage)})
                estimator.fit(train.x, train.y, **fit_kwargs)
            elif stages.how == "partial":
                rows = order.permutation(len(train))
                extra = {"classes": np.arange(task.num_classes)} if task.kind == "classification" else {}
                if weights is not None:
                    extra["sample_weight"] = weights[rows]
                estimator.partial_fit(train.x[rows], train.y[rows], **extra)
            else:
                estimator.fit(train.x, train.y, **fit_kwargs)
        seconds = time.perf_counter() - began
        trained_on = predicted_metrics(predictor, train.x, train.y, task)
        metrics = {
            "epoch": float(stage),
            "train_loss": trained_on.get("loss", float("nan")),
            "train_samples_per_s": len(train) / max(seconds, 1e-9),
            **{f"valid_{k}": v for k, v in predicted_metrics(predictor, valid.x, valid.y, task).items()},
        }
        if not all(math.isfinite(metrics[k]) for k in ("train_loss", "valid_loss") if k in metrics):
            raise TrainingFailed(
                f"stage {stage}: the loss is not a finite number; the estimator diverged: lower its "
                "learning rate or scale (model.params)"
            )
        on_stage(metrics, estimator)
        if stopping is not None and stopping.on_epoch(metrics).action is Action.STOP:
            break
    return estimator


def _save(folder: Path, estimator: Any, stage: int) -> None:
    with open(folder / STATE_FILE, "wb") as out:
        pickle.dump(estimator, out, protocol=5)
    (folder / PROGRESS_FILE).write_text(json.dumps({"stage": stage}))


def _load(folder: Path) -> tuple[Any, int]:
    with open(folder / STATE_FILE, "rb") as source:
        estimator = pickle.load(source)  # written by this family, for this run
    return estimator, int(json.loads((folder / PROGRESS_FILE).read_text())["stage"])


def _threads(job: TrainJob) -> int:
    return max(1, round(job.train.scaling.cpus_per_worker))


class SklearnFamily:
    name = "sklearn"

    def check_params(self, config: AnyModelConfig) -> None:
        config = _sklearn_config(config)
        paths = [p for p in BUILTIN.get(config.name, (config.name, None)) if p is not None]
        _check_keys(config, [estimator_class(p) for p in paths])

    def check_on_rows(self, config: AnyModelConfig, rows: np.ndarray, task: str, num_outputs: int) -> None:
        build_estimator(_sklearn_config(config), task)

    def layout(self, job: TrainJob, *, embedded: bool) -> tuple[TrainJob, str]:
        return job, f"one process (scikit-learn), {_threads(job)} thread(s)"

    def train(
        self,
        job: TrainJob,
        feature_set: FeatureSet,
        *,
        run_name: str,
        storage_path: Location,
        on_epoch: Callable[[dict[str, float]], None],
        on_notice: Callable[[str], None],
        embedded: bool,
    ) -> Trained:
        config = _sklearn_config(job.model)
        estimator = build_estimator(config, job.task.kind, seed=job.train.seed, threads=_threads(job))
        history: list[dict[str, float]] = []

        def on_stage(metrics: dict[str, float], _: Any) -> None:
            history.append(metrics)
            on_epoch(metrics)

        fit_in_stages(estimator, job, feature_set.read("train"), feature_set.read("valid"), on_stage)
        folder = (
            storage_path.local_path / run_name
            if storage_path.local
            else Path(tempfile.mkdtemp(prefix="raylens-sklearn-"))
        )
        folder.mkdir(parents=True, exist_ok=True)
        _save(folder, estimator, len(history))
        return Trained(SklearnPredictor(estimator, job.task), history, folder)

    def run_trial(
        self,
        job: TrainJob,
        train: SplitArrays,
        valid: SplitArrays,
        report: TrialReport,
        resume_from: Path | None,
    ) -> None:
        config = _sklearn_config(job.model)
        estimator = build_estimator(config, job.task.kind, seed=job.train.seed, threads=_threads(job))
        stages, start = stages_of(estimator, job.train.epochs), 0
        if resume_from is not None:
            estimator, start = _load(resume_from)

        def on_stage(metrics: dict[str, float], fitted: Any) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                _save(Path(tmp), fitted, int(metrics["epoch"]))
                report(metrics, Path(tmp))

        fit_in_stages(estimator, job, train, valid, on_stage, start=start, stages=stages)

    def trial_predictor(self, job: TrainJob, checkpoint: Path) -> SklearnPredictor:
        return SklearnPredictor(_load(checkpoint)[0], job.task)

    def model_files(self, trained: Trained, config: AnyModelConfig, folder: Path) -> ModelFiles:
        predictor = trained.predictor
        assert isinstance(predictor, SklearnPredictor)
        buffer = io.BytesIO()
        pickle.dump(predictor.estimator, buffer, protocol=5)
        (folder / STATE_FILE).write_bytes(buffer.getvalue())
        name = _sklearn_config(config).name
        code = [] if name in BUILTIN else user_code(name)
        return ModelFiles({ESTIMATOR: str(folder / STATE_FILE)}, buffer.getvalue(), code)

    def load_predictor(
        self, artifacts: Mapping[str, str], config: AnyModelConfig, task: TaskSpec, in_features: int
    ) -> SklearnPredictor:
        with open(artifacts[ESTIMATOR], "rb") as source:
            return SklearnPredictor(pickle.load(source), task)  # the model's own file


FAMILY = SklearnFamily()
