"""Everything about an experiment that can be checked before Ray starts, every problem at once.

``raylens validate`` and ``--dry-run`` print the report; ``Experiment.run`` raises its problems
as one ``UserError`` before anything is written. Checks that do not depend on each other all run:
a mistake in the model's parameters, one in the data and one in the Ray address are reported
together, not in three rounds. The model is checked on a real batch only when the data could be
read, since it needs the data's width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylens.cluster.spec import ExperimentSpec, check_model_params
from raylens.errors import UserError, did_you_mean
from raylens.storage import Location, check_reachable
from raylens.trainer import TorchModelConfig

if TYPE_CHECKING:
    from raylens.features import PlannedFeatureSet, RowsDone


@dataclass(frozen=True)
class CheckReport:
    """What the checks found: the planned feature set (when the data could be read) and the
    problems, each a message naming the key or input and its fix."""

    planned: PlannedFeatureSet | None
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_problems(self) -> None:
        """One ``UserError`` holding every problem, or nothing when there is none."""
        if len(self.problems) == 1:
            raise UserError(self.problems[0])
        if self.problems:
            listed = "\n".join(f"  - {problem}" for problem in self.problems)
            raise UserError(f"{len(self.problems)} problems were found:\n{listed}")


class _Problems:
    def __init__(self) -> None:
        self.found: list[str] = []

    def check(self, step: Callable[[], Any]) -> Any:
        """Run one check; its ``UserError`` is recorded and ``None`` returned."""
        try:
            return step()
        except UserError as exc:
            self.found.append(str(exc))
            return None


def check_experiment(
    spec: ExperimentSpec,
    base_dir: Path,
    *,
    tune: bool,
    code_dirs: Sequence[Path] = (),
    address: str | None = None,
    tracking_uri: str | None = None,
    runs_dir_given: bool = True,
    storage: Location | None = None,
    feature_store: Location | None = None,
    rows_done: RowsDone | None = None,
) -> CheckReport:
    """Check ``spec`` (model parameters, every configuration its sweep may sample), its data (read
    and prepared as a build does, nothing written), the model on a real batch, the sweep's metric, and
    ``address`` and ``tracking_uri`` when given. ``tune=False`` leaves the sweep out. A user's
    model factory is imported from ``code_dirs`` (the spec's folder, the working one).
    ``rows_done`` hears of the data's progress (``plan_feature_set``)."""
    from raylens.cluster.runtime import check_address, check_remote_settings
    from raylens.features import plan_feature_set
    from raylens.trainer import importable_from

    problems = _Problems()
    with importable_from(code_dirs):
        problems.check(lambda: check_model_params(spec))
        params_ok = not problems.found
        planned: PlannedFeatureSet | None = problems.check(
            lambda: plan_feature_set(
                spec.name, spec.data, spec.features, base_dir, feature_store, rows_done=rows_done
            )
        )
        if planned is not None and params_ok:
            problems.check(lambda: _check_model_on_data(spec, planned, tune=tune))
            if spec.train.scaling.strategy == "pipeline" and isinstance(spec.model, TorchModelConfig):
                problems.check(lambda: _check_pipeline(spec, planned))
        if planned is not None:
            problems.check(lambda: _check_class_weights(spec, planned))
    if tune and spec.tune is not None:
        # Without the data the task may be unknown: then a name no task reports is still wrong.
        task = planned.task if planned is not None else None if spec.data.task == "auto" else spec.data.task
        classes = planned.num_outputs if planned is not None and task == "classification" else None
        problems.check(lambda: _check_metric(spec, task, classes))
    if spec.train.early_stopping is not None and planned is not None:
        problems.check(lambda: _check_early_stopping(spec, planned))
    if spec.train.best_checkpoint is not None and planned is not None:
        problems.check(lambda: _check_best_checkpoint(spec, planned))
    if address is None:
        problems.check(lambda: _check_fits_embedded(spec, tune=tune))
    problems.check(lambda: check_address(address))
    problems.check(lambda: check_remote_settings(address, runs_dir_given=runs_dir_given))
    if storage is not None:
        problems.check(lambda: check_reachable(storage))
    if tracking_uri is not None:
        from raylens.trainer.tracking import check_tracking_uri

        problems.check(lambda: check_tracking_uri(tracking_uri))
    return CheckReport(planned, tuple(problems.found))


def _check_model_on_data(spec: ExperimentSpec, planned: PlannedFeatureSet, *, tune: bool) -> None:
    """The model, and each configuration the sweep may sample, built and run on real rows."""
    from raylens.trainer.family import family_of
    from raylens.tuning import sampled_configs

    rows = planned.sample(2)
    family_of(spec.model).check_on_rows(spec.model, rows, planned.task, planned.num_outputs)
    debug = spec.train.debug
    if debug is not None and (debug.layers or debug.tensors) and isinstance(spec.model, TorchModelConfig):
        from raylens.trainer import build_model
        from raylens.trainer.debug.capture import check_layers

        built = build_model(spec.model, rows.shape[1], planned.num_outputs)
        check_layers(built, debug.layers, "train.debug.layers")
        check_layers(built, debug.tensors, "train.debug.tensors")
    if not tune or spec.tune is None:
        return
    for name, values, model, _ in sampled_configs(spec.tune, spec.model, spec.train):
        try:
            family_of(model).check_on_rows(model, rows, planned.task, planned.num_outputs)
        except UserError as exc:
            drawn = ", ".join(f"{k}={v!r}" for k, v in values.items())
            where = (
                f"tune.candidates: a configuration of {name}"
                if spec.tune.candidates
                else ("tune.space: a configuration")
            )
            raise UserError(f"{where} the sweep may sample ({drawn}) fails: {exc}") from None


def _check_pipeline(spec: ExperimentSpec, planned: PlannedFeatureSet) -> None:
    """The model cut into one stage per worker, traced on a microbatch of real rows, as each
    worker will cut it."""
    import torch

    from raylens.trainer import build_model
    from raylens.trainer.parallel.pipeline import PipelineError, check_cut

    scaling, batch_size = spec.train.scaling, spec.train.batch_size
    train_rows = len(planned.splits["train"].y)
    if train_rows < batch_size:
        raise UserError(
            f"train.batch_size: the training split has {train_rows} rows, fewer than one batch "
            f"({batch_size}), and a pipeline trains whole batches only: lower train.batch_size"
        )
    rows = torch.from_numpy(planned.sample(batch_size // scaling.pipeline.microbatches))
    assert isinstance(spec.model, TorchModelConfig)
    model = build_model(spec.model, rows.shape[1], planned.num_outputs)
    try:
        check_cut(model, rows, scaling.max_workers, scaling.pipeline)
    except PipelineError as exc:
        raise UserError(f"train.scaling.pipeline: {exc}") from None


def _check_class_weights(spec: ExperimentSpec, planned: PlannedFeatureSet) -> None:
    from raylens.trainer.task import resolve_class_weights

    resolve_class_weights(spec.train.class_weights, planned.classes, planned.splits["train"].y)


def _check_early_stopping(spec: ExperimentSpec, planned: PlannedFeatureSet) -> None:
    from raylens.trainer.metrics import reported_metrics

    assert spec.train.early_stopping is not None
    metric = spec.train.early_stopping.metric
    classes = planned.num_outputs if planned.task == "classification" else None
    reported = [name for name in reported_metrics(planned.task, classes) if name != "epoch"]
    if metric not in reported:
        raise UserError(
            f"train.early_stopping.metric: '{metric}' is not a metric raylens reports for {planned.task}"
            f"{did_you_mean(metric, reported)}; use one of {', '.join(reported)}"
        )


def _check_best_checkpoint(spec: ExperimentSpec, planned: PlannedFeatureSet) -> None:
    from raylens.trainer.metrics import reported_metrics

    assert spec.train.best_checkpoint is not None
    metric = spec.train.best_checkpoint.metric
    classes = planned.num_outputs if planned.task == "classification" else None
    # Validation metrics only: they come with every checkpoint, mid-epoch ones included.
    reported = [name for name in reported_metrics(planned.task, classes) if name.startswith("valid_")]
    if metric not in reported:
        raise UserError(
            f"train.best_checkpoint.metric: '{metric}' is not a validation metric raylens reports for "
            f"{planned.task}{did_you_mean(metric, reported)}; use one of {', '.join(reported)}"
        )


def _check_fits_embedded(spec: ExperimentSpec, *, tune: bool) -> None:
    """The embedded cluster's size is known before it starts: a run that could never fit is a
    mistake in the spec (Ray would wait for resources forever)."""
    import torch

    from raylens.cluster.resources import resource_shortfall
    from raylens.cluster.runtime import embedded_cpus

    scaling = spec.train.scaling
    short = resource_shortfall(
        spec.train,
        spec.tune if tune else None,
        cpus=embedded_cpus(),
        gpus=torch.cuda.device_count(),
        # One CPU worker trains in the raylens process itself, not in a Ray worker.
        trains=scaling.max_workers > 1 or scaling.use_gpu,
    )
    if short is not None:
        raise UserError(
            f"{short} (embedded Ray: {embedded_cpus()} logical CPUs on this machine); lower "
            "train.scaling.workers or cpus_per_worker (or tune.workers_per_trial), or run on a "
            "larger cluster with --address"
        )


def _check_metric(spec: ExperimentSpec, task: str | None, num_classes: int | None) -> None:
    from raylens.trainer.metrics import reported_metrics
    from raylens.tuning.candidates import check_objectives

    assert spec.tune is not None
    tasks = [task] if task else ["classification", "regression"]
    reported = list(dict.fromkeys(name for each in tasks for name in reported_metrics(each, num_classes)))
    if spec.tune.metric not in reported:
        raise UserError(
            f"tune.metric: '{spec.tune.metric}' is not a metric raylens reports for {' or '.join(tasks)}"
            f"{did_you_mean(spec.tune.metric, reported)}; use one of {', '.join(reported)}"
        )
    check_objectives(spec.tune, task, num_classes)
