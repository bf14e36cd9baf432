"""A tracked training run: train, evaluate on the test split, record, register.

The driver is the one writer: epochs arrive from the family's training (rank 0 of a Ray Train
run, a scikit-learn fit) and are logged as they come; the test evaluation runs here, on the
model the family hands back, whatever trained it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylens.features import FeatureSet
from raylens.storage import Location
from raylens.trainer.debug.report import read_debug, record_debug
from raylens.trainer.family import TrainJob, family_of
from raylens.trainer.metrics import score_test_split
from raylens.trainer.plots import confusion_matrix_figure, learning_curves_figure
from raylens.trainer.tracking import Tracker, ended_status

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
    layout: str | None = None,
) -> TrainRunResult:
    """Train, evaluate on the test split, log and register. With ``run_id`` (a resume) the run
    goes on in that MLflow run: epochs it already holds are not logged again, and its learning
    curves cover every epoch, before and after the interruption. ``embedded``: as
    the family's training takes it (a 1-worker CPU run then trains in this process). ``layout``:
    how the family laid the job out (``ModelFamily.layout``), recorded as the
    ``raylens.parallel`` tag."""
    family = family_of(job.model)
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
            reason = layout if layout is not None else family.layout(job, embedded=embedded)[1]
            tracker.set_tags(run_id, {"raylens.parallel": reason, "raylens.model_family": job.model.family})
            tracker.log_dict(run_id, feature_set.manifest.to_dict(), "feature_set/manifest.json")
            if feature_set.manifest.quarantined:  # the data validation's report: rows set aside, by reason
                tracker.log_dict(run_id, feature_set.manifest.quarantined, "feature_set/quarantined.json")
                tracker.set_tags(
                    run_id,
                    {"raylens.data.quarantined_rows": str(sum(feature_set.manifest.quarantined.values()))},
                )
        # Keyed by epoch: fractional for a mid-epoch evaluation (train.eval_every_steps).
        history = {m["epoch"]: m for m in earlier if "epoch" in m}

        def record_epoch(metrics: dict[str, float]) -> None:
            epoch = metrics["epoch"]
            if epoch not in history:  # one value per report, whatever was replayed or resumed
                history[epoch] = metrics
                # By optimizer step when the run reports steps, else by epoch.
                tracker.log_metrics(run_id, metrics, step=int(metrics.get("step", epoch)))
            on_epoch(metrics)

        trained = family.train(
            job,
            feature_set,
            run_name=run_name,
            storage_path=Location.of(storage_path),
            on_epoch=record_epoch,
            on_notice=on_notice,
            embedded=embedded,
        )
        history_in_order = [history[e] for e in sorted(history)]
        if trained.tags:
            tracker.set_tags(run_id, trained.tags)
        record_debug(
            tracker, run_id, read_debug(trained.checkpoint_dir), trained.tags.get("raylens.stopped_by")
        )
        test = feature_set.read("test")
        scores = score_test_split(trained.predictor, test.x, test.y, job.task, feature_set.classes)
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
        if history_in_order:
            tracker.log_figure(run_id, learning_curves_figure(history_in_order), "plots/learning_curves.png")
        lineage = (
            {"git_commit": tags["mlflow.source.git.commit"]} if "mlflow.source.git.commit" in tags else {}
        )
        logged = tracker.log_model(
            run_id,
            trained,
            job,
            feature_set,
            x_sample=test.x,
            register_as=register_as,
            lineage=lineage,
            headline=scores.overall,
        )
        tracker.end_run(run_id, "FINISHED")
    except BaseException as exc:
        tracker.end_run(run_id, ended_status(exc))
        if not isinstance(exc, KeyboardInterrupt):
            tracker.set_tags(run_id, {"raylens.error": str(exc)[:4000]})
        raise
    version = logged.version if logged is not None else None
    return TrainRunResult(
        run_id,
        test_metrics,
        history_in_order,
        trained.checkpoint_dir,
        logged.uri if logged is not None else None,
        register_as if version else None,
        version,
        confusion,
        logged.registered_now if logged is not None else False,
    )
