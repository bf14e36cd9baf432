"""A tracked training run: train with Ray Train, evaluate on the test split, record, register.

The driver is the one writer: epochs arrive from rank 0 and are logged as they come; the test
evaluation runs here, on the final checkpoint, whatever strategy trained it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raylens.features import FeatureSet, SplitArrays
from raylens.interrupts import deferred_interrupts
from raylens.interrupts import pending as interrupt_pending
from raylens.storage import Location
from raylens.trainer.artifacts import log_model
from raylens.trainer.job import TrainJob
from raylens.trainer.loop import Batches, evaluate, predict_proba
from raylens.trainer.metrics import classification_test_metrics, confusion_matrix
from raylens.trainer.models import build_model
from raylens.trainer.parallel import ParallelPlan, load_model_weights
from raylens.trainer.parallel.plan import one_process_reason, worker_memory
from raylens.trainer.plots import confusion_matrix_figure, learning_curves_figure
from raylens.trainer.ray_train import train_distributed
from raylens.trainer.tracking import MlflowTracker, Tracker, ended_status

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
    registered_now: bool = False
    """False when the model was identical to the registered version given, so not registered again."""


@dataclass(frozen=True)
class SplitScores:
    """A model's metrics on the test split, named as the run logs them (``test_...``)."""

    overall: dict[str, float]
    """Loss and metrics of the whole split: the run's, and the registered version's tags."""
    per_class: dict[str, float]
    """Precision and recall of each class (more than two classes only): the run's."""
    confusion: np.ndarray | None
    """The confusion matrix (classification with test rows)."""


def score_test_split(
    model: nn.Module, test: SplitArrays, job: TrainJob, classes: Sequence[Any] | None
) -> SplitScores:
    """The loss and validation metrics of ``evaluate``, and for classification scikit-learn's
    scores of the class probabilities (``classification_test_metrics``)."""
    batches = Batches.from_numpy(test.x, test.y)
    overall = {f"test_{k}": v for k, v in evaluate(model, batches, job.task).items()}
    if job.task.kind != "classification" or not len(test):
        return SplitScores(overall, {}, None)
    probabilities = predict_proba(model, batches.x, job.task)
    scored, per_class = classification_test_metrics(test.y, probabilities, classes or [])
    overall.update({f"test_{k}": v for k, v in scored.items()})
    matrix = confusion_matrix(test.y, probabilities.argmax(axis=1), job.task.num_classes)
    return SplitScores(overall, {f"test_{k}": v for k, v in per_class.items()}, matrix)


def node_layout(job: TrainJob, *, embedded: bool) -> tuple[TrainJob, ParallelPlan]:
    """The job as it will train, and its plan. On the embedded cluster (one machine) ``auto``
    with several CPU workers trains in one process with all their CPUs, while a replica fits
    (``one_process_reason``); elsewhere the job is as given."""
    scaling = job.train.scaling
    if embedded and scaling.strategy == "auto" and not scaling.use_gpu and isinstance(scaling.workers, int):
        model = build_model(job.model, job.in_features, job.task.out_features)
        cpus = scaling.workers * scaling.cpus_per_worker
        reason = one_process_reason(
            scaling.workers,
            cpus,
            sum(p.numel() for p in model.parameters()),
            worker_memory(torch.device("cpu"), 1),
        )
        if reason is not None:
            one = scaling.model_copy(update={"workers": 1, "cpus_per_worker": cpus})
            job = replace(job, train=job.train.model_copy(update={"scaling": one}))
            return job, ParallelPlan("none", 1, "cpu", reason)
    return job, parallel_plan(job)


def parallel_plan(job: TrainJob) -> ParallelPlan:
    """The strategy the run's workers will apply, and why (recorded as the run's tag), judged
    here with this machine's memory (each rank judges with its own, the smallest winning)."""
    scaling = job.train.scaling
    device = torch.device("cuda" if scaling.use_gpu else "cpu")
    model = build_model(job.model, job.in_features, job.task.out_features)
    return ParallelPlan.from_config(
        scaling.strategy,
        scaling.max_workers,
        device.type,
        parameters=sum(p.numel() for p in model.parameters()),
        worker_memory=worker_memory(device, scaling.max_workers) if device.type == "cpu" else None,
        pipeline=scaling.pipeline,
    )


def train_and_record(
    job: TrainJob,
    feature_set: FeatureSet,
    *,
    tracker: Tracker,
    run_name: str,
    storage_path: Path | str | Location,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    register_as: str | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    on_run_started: Callable[[str], None] = lambda run_id: None,
    on_epoch: EpochListener = lambda metrics: None,
    on_notice: Callable[[str], None] = logging.getLogger(__name__).warning,
    embedded: bool = False,
    plan: ParallelPlan | None = None,
) -> TrainRunResult:
    """Train, evaluate on the test split, log and register. With ``run_id`` (a resume) the run
    goes on in that MLflow run: epochs it already holds are not logged again, and its learning
    curves cover every epoch, before and after the interruption. ``embedded``: as
    ``train_distributed`` takes it (a 1-worker CPU run then trains in this process). ``plan``:
    the one ``node_layout`` made the job with (recorded as the ``raylens.parallel`` tag)."""
    if run_id is None:
        run_id = tracker.start_run(run_name, parent_run_id=parent_run_id, tags=tags)
        earlier: list[dict[str, float]] = []
    else:
        tracker.reopen_run(run_id)
        earlier = tracker.metric_history(run_id)
    on_run_started(run_id)
    try:
        if not earlier:
            tracker.log_params(run_id, params)
            tracker.set_tags(run_id, {"raylens.parallel": (plan or parallel_plan(job)).reason})
            tracker.log_dict(run_id, feature_set.manifest, "feature_set/manifest.json")
        # Keyed by epoch: fractional for a mid-epoch evaluation (train.eval_every_steps).
        history = {m["epoch"]: m for m in earlier if "epoch" in m}

        def record_epoch(metrics: dict[str, float]) -> None:
            epoch = metrics["epoch"]
            if epoch not in history:  # one value per report, whatever was replayed or resumed
                history[epoch] = metrics
                # By optimizer step when the run reports steps, else by epoch.
                tracker.log_metrics(run_id, metrics, step=int(metrics.get("step", epoch)))
            on_epoch(metrics)

        outcome = train_distributed(
            job,
            feature_set,
            run_name=run_name,
            storage_path=storage_path,
            on_epoch=record_epoch,
            on_notice=on_notice,
            embedded=embedded,
        )
        outcome = replace(outcome, history=[history[e] for e in sorted(history)])
        model = build_model(job.model, job.in_features, job.task.out_features)
        chosen = outcome.checkpoint_dir
        if outcome.best is not None:
            chosen, reported = outcome.best
            tracker.set_tags(
                run_id,
                {"raylens.model_epoch": f"{reported['epoch']:g}", "raylens.model_checkpoint": chosen.name},
            )
        load_model_weights(model, chosen)
        test = feature_set.read("test")
        scores = score_test_split(model, test, job, feature_set.classes)
        confusion = None
        if scores.confusion is not None:
            confusion = scores.confusion.tolist()
            tracker.log_dict(
                run_id, {"labels": feature_set.classes, "matrix": confusion}, "test_confusion_matrix.json"
            )
            tracker.log_figure(
                run_id,
                confusion_matrix_figure(scores.confusion, feature_set.classes or [], "test confusion matrix"),
                "plots/test_confusion_matrix.png",
            )
        test_metrics = {**scores.overall, **scores.per_class}
        tracker.log_metrics(run_id, test_metrics, step=job.train.epochs)
        if outcome.history:
            tracker.log_figure(run_id, learning_curves_figure(outcome.history), "plots/learning_curves.png")
        model_uri = version = None
        registered_now = False
        if isinstance(tracker, MlflowTracker):
            lineage = (
                {"git_commit": tags["mlflow.source.git.commit"]} if "mlflow.source.git.commit" in tags else {}
            )
            # Logging and registering is many writes: a stop signal waits for them, and then the
            # version is taken back, so an interrupted run never leaves a registered model.
            with deferred_interrupts():
                logged = log_model(
                    tracker, run_id, model, job, feature_set, test.x, register_as, lineage, scores.overall
                )
                model_uri, version, registered_now = logged.uri, logged.version, logged.registered_now
                if register_as and version and logged.registered_now and interrupt_pending():
                    tracker.client.delete_model_version(register_as, version)
                    version = None
        tracker.end_run(run_id, "FINISHED")
    except BaseException as exc:
        tracker.end_run(run_id, ended_status(exc))
        if not isinstance(exc, KeyboardInterrupt):
            tracker.set_tags(run_id, {"raylens.error": str(exc)[:4000]})
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
        registered_now,
    )
