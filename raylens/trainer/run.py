"""A tracked training run: train with Ray Train, evaluate on the test split, record, register.

The driver is the one writer: epochs arrive from rank 0 and are logged as they come; the test
evaluation runs here, on the final checkpoint, whatever strategy trained it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

import raylens
from raylens.features import FeatureSet, invert_all, transforms_from_dicts
from raylens.trainer.artifacts import TabularTorchModel, write_model_files
from raylens.trainer.job import TrainJob
from raylens.trainer.loop import Batches, evaluate, predict
from raylens.trainer.metrics import confusion_matrix
from raylens.trainer.models import build_model
from raylens.trainer.parallel import load_checkpoint
from raylens.trainer.plots import confusion_matrix_figure, learning_curves_figure
from raylens.trainer.ray_train import train_distributed
from raylens.trainer.tracking import MlflowTracker, Tracker

EpochListener = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class TrainRunResult:
    run_id: str
    test_metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoint_dir: Path
    model_uri: str | None = None
    registered_name: str | None = None
    registered_version: str | None = None
    confusion: list[list[int]] | None = field(default=None)


def train_and_record(
    job: TrainJob,
    feature_set: FeatureSet,
    *,
    tracker: Tracker,
    run_name: str,
    storage_path: Path,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    register_as: str | None = None,
    parent_run_id: str | None = None,
    on_epoch: EpochListener = lambda metrics: None,
) -> TrainRunResult:
    run_id = tracker.start_run(run_name, parent_run_id=parent_run_id, tags=tags)
    try:
        tracker.log_params(run_id, params)
        tracker.log_dict(run_id, feature_set.manifest, "feature_set/manifest.json")

        def record_epoch(metrics: dict[str, float]) -> None:
            tracker.log_metrics(run_id, metrics, step=int(metrics["epoch"]))
            on_epoch(metrics)

        outcome = train_distributed(
            job, feature_set, run_name=run_name, storage_path=storage_path, on_epoch=record_epoch
        )
        state = load_checkpoint(outcome.checkpoint_dir)
        model = build_model(job.model, job.in_features, job.task.out_features)
        model.load_state_dict(state["model"])
        test = feature_set.read("test")
        test_batches = Batches.from_numpy(test.x, test.y)
        test_metrics = {f"test_{k}": v for k, v in evaluate(model, test_batches, job.task).items()}
        tracker.log_metrics(run_id, test_metrics, step=job.train.epochs)
        if outcome.history:
            tracker.log_figure(run_id, learning_curves_figure(outcome.history), "plots/learning_curves.png")
        confusion = None
        if job.task.kind == "classification" and len(test):
            matrix = confusion_matrix(test.y, predict(model, test_batches.x, job.task), job.task.num_classes)
            confusion = matrix.tolist()
            tracker.log_dict(
                run_id, {"labels": feature_set.classes, "matrix": confusion}, "test_confusion_matrix.json"
            )
            tracker.log_figure(
                run_id,
                confusion_matrix_figure(matrix, feature_set.classes or [], "test confusion matrix"),
                "plots/test_confusion_matrix.png",
            )
        model_uri = version = None
        if isinstance(tracker, MlflowTracker):
            lineage = (
                {"git_commit": tags["mlflow.source.git.commit"]} if "mlflow.source.git.commit" in tags else {}
            )
            model_uri, version = _log_model(
                tracker, run_id, model, job, feature_set, test.x, register_as, lineage
            )
        tracker.end_run(run_id, "FINISHED")
    except BaseException as exc:
        tracker.end_run(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return TrainRunResult(
        run_id,
        test_metrics,
        outcome.history,
        outcome.checkpoint_dir,
        model_uri,
        register_as if version else None,
        version,
        confusion,
    )


def _log_model(
    tracker: MlflowTracker,
    run_id: str,
    model: torch.nn.Module,
    job: TrainJob,
    feature_set: FeatureSet,
    x_test: np.ndarray,
    register_as: str | None,
    lineage: Mapping[str, str],
) -> tuple[str, str | None]:
    import mlflow
    from mlflow.models import infer_signature

    columns = feature_set.feature_columns
    transforms = transforms_from_dicts(feature_set.manifest["transforms"])
    sample = x_test[:5] if len(x_test) else feature_set.read("train").x[:5]
    # The signature takes the columns with the types the user's raw data has (from the manifest).
    raw_types = {c: pa.type_for_alias(feature_set.manifest["schema"][c]).to_pandas_dtype() for c in columns}
    example = pd.DataFrame(invert_all(transforms, sample, columns), columns=columns)
    whole = [c for c, t in raw_types.items() if not np.issubdtype(t, np.floating)]
    example[whole] = example[whole].round()  # undo float error before casting back to int/bool
    example = example.astype(raw_types)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_model_files(Path(tmp), model.state_dict(), job.model, job.task, feature_set)
        loaded = TabularTorchModel()
        loaded.load_context(_Context(artifacts))  # type: ignore[arg-type]
        signature = infer_signature(example, loaded.predict(None, example))  # type: ignore[arg-type]
        # MLflow prints registry chatter straight to stderr; keep it for --verbose logs only.
        chatter = io.StringIO()
        with tracker.active(run_id), contextlib.redirect_stderr(chatter):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=TabularTorchModel(),
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                registered_model_name=register_as,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"mlflow=={mlflow.__version__}",
                    f"raylens=={raylens.__version__}",
                    "pandas",
                    "numpy",
                ],
                metadata={
                    "raylens_version": raylens.__version__,
                    "feature_set": feature_set.name,
                    "feature_set_version": feature_set.version,
                    "task": job.task.kind,
                    **lineage,
                },
            )
    if chatter.getvalue().strip():
        logging.getLogger(__name__).info(chatter.getvalue().strip())
    version = str(info.registered_model_version) if register_as and info.registered_model_version else None
    return info.model_uri, version


class _Context:
    """Enough of ``PythonModelContext`` to load the model before it is logged (for the signature)."""

    def __init__(self, artifacts: dict[str, str]) -> None:
        self.artifacts = artifacts
        self.model_config: dict[str, Any] = {}
