"""The experiment: one spec driven through the whole phase.

    check → prepare → features → (tune) → train → evaluate → register

``Experiment.from_yaml(path).run()`` is what ``raylens run`` calls; notebooks and tests call it
too. Each stage is a function of a lower package; this module composes them, keeps the run's
MLflow tree (one root run per run, the sweep's trials and the final training run nested under
it) and the run's record (``raylens.cluster.runs``), which lets ``--resume`` continue it.

Order matters for "nothing written on bad input": everything that can be checked in the driver
is checked first (spec, data, the model on a real batch, the sweep's metric, the resumed run's
spec and data, the Ray address, the tracking store); only then are the feature set, the run
folder and MLflow runs written.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

import raylens
from raylens.cluster.runs import (
    LATEST,
    RunLock,
    RunRecord,
    Status,
    abandoned_runs,
    spec_changes,
    spec_fingerprint,
)
from raylens.cluster.runtime import RuntimeSettings, check_address, start_ray, stop_ray
from raylens.cluster.spec import ExperimentSpec, load_spec
from raylens.cluster.workspace import Workspace
from raylens.errors import UserError, did_you_mean
from raylens.features import FeatureSet, PlannedFeatureSet, plan_feature_set, publish_feature_set
from raylens.trainer import ModelConfig, TrainConfig, TrainJob, check_model_runs, importable_from
from raylens.trainer.metrics import reported_metrics
from raylens.trainer.run import TrainRunResult, train_and_record
from raylens.trainer.tracking import MlflowTracker, check_tracking_uri, ended_status, git_commit, redact
from raylens.tuning import ConcurrencyPlan, parse_space, sample_configs, with_overrides
from raylens.tuning.sweep import SweepResult, run_sweep


class Progress(Protocol):
    """What a front end (the CLI's progress bars) hears about a run."""

    def stage(self, title: str) -> None: ...
    def notice(self, text: str) -> None: ...
    def feature_set(self, feature_set: FeatureSet) -> None: ...
    def sweep_started(self, trials: int) -> None: ...
    def trial(self, event: Any) -> None: ...
    def sweep_finished(self) -> None: ...
    def training_started(self, epochs: int, workers: int) -> None: ...
    def epoch(self, metrics: dict[str, float]) -> None: ...
    def training_finished(self) -> None: ...


class NullProgress:
    def stage(self, title: str) -> None: ...
    def notice(self, text: str) -> None: ...
    def feature_set(self, feature_set: FeatureSet) -> None: ...
    def sweep_started(self, trials: int) -> None: ...
    def trial(self, event: Any) -> None: ...
    def sweep_finished(self) -> None: ...
    def training_started(self, epochs: int, workers: int) -> None: ...
    def epoch(self, metrics: dict[str, float]) -> None: ...
    def training_finished(self) -> None: ...


@dataclass(frozen=True)
class RunSummary:
    name: str
    run_name: str
    feature_set: FeatureSet
    tracking_uri: str
    root_run_id: str
    final: TrainRunResult | None = None
    best_config: dict[str, Any] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    trials: int = 0
    concurrency: ConcurrencyPlan | None = None


def command_name(tune: bool, train: bool) -> str:
    """The CLI command a combination of stages is: a resume must continue the same one."""
    return "tune" if not train else ("run" if tune else "train")


@dataclass(frozen=True)
class Experiment:
    spec: ExperimentSpec
    spec_text: str
    base_dir: Path
    workspace: Workspace

    @classmethod
    def from_yaml(cls, path: str | Path, runs_dir: Path | None = None) -> Experiment:
        path = Path(path)
        base_dir = path.resolve().parent
        with importable_from([base_dir, Path.cwd()]):
            spec = load_spec(path)
        return cls(spec, path.read_text(), base_dir, Workspace.at(runs_dir))

    @property
    def code_dirs(self) -> list[Path]:
        """Where user model factories are imported from: the spec's folder and the working one."""
        return [self.base_dir, Path.cwd()]

    @property
    def tracking_uri(self) -> str:
        return self.workspace.tracking_uri(self.spec.tracking.uri)

    def plan_features(self) -> PlannedFeatureSet:
        """The data prepare and feature pipelines, checked and computed, nothing written."""
        return plan_feature_set(self.spec.name, self.spec.data, self.spec.features, self.base_dir)

    def build_features(self) -> FeatureSet:
        """Run the data prepare and feature pipelines; the version is reused when unchanged."""
        return publish_feature_set(self.plan_features(), self.workspace.feature_store)

    def run(
        self,
        *,
        tune: bool = True,
        train: bool = True,
        resume: bool = False,
        verbose: bool = False,
        address: str | None = None,
        progress: Progress | None = None,
    ) -> RunSummary:
        """The whole phase. ``tune=False`` trains the spec as written; ``train=False`` stops after
        the sweep. ``resume`` continues the latest run of this spec where it stopped.

        Raises ``UserError`` (nothing written) for a mistake in the input, and ``Interrupted`` /
        ``KeyboardInterrupt`` after marking the run's MLflow runs KILLED when stopped."""
        with importable_from(self.code_dirs):
            return _Invocation(self, command_name(tune, train), resume, progress or NullProgress()).run(
                verbose=verbose, address=address
            )

    def check(self, planned: PlannedFeatureSet, *, tune: bool) -> None:
        """Everything about the model and the sweep that can fail in a worker, checked here on a
        real batch of the feature set: each config the sweep may sample, and its metric."""
        spec = self.spec
        rows = torch.from_numpy(planned.sample(2))
        check_model_runs(spec.model, rows, planned.num_outputs)
        if not tune or spec.tune is None:
            return
        reported = reported_metrics(planned.task)
        if spec.tune.metric not in reported:
            raise UserError(
                f"tune.metric: '{spec.tune.metric}' is not a metric raylens reports for {planned.task}"
                f"{did_you_mean(spec.tune.metric, reported)}; use one of {', '.join(reported)}"
            )
        space = parse_space(spec.tune.space)
        for values, model, _ in sample_configs(space, spec.model, spec.train, spec.tune.seed):
            try:
                check_model_runs(model, rows, planned.num_outputs)
            except UserError as exc:
                drawn = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise UserError(
                    f"tune.space: a configuration the sweep may sample ({drawn}) fails: {exc}"
                ) from None

    def spec_dump(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json")


class _Invocation:
    """One call of ``Experiment.run``: its run record, lock, tracker and stages."""

    def __init__(self, experiment: Experiment, command: str, resume: bool, progress: Progress) -> None:
        self.experiment = experiment
        self.spec = experiment.spec
        self.workspace = experiment.workspace
        self.command = command
        self.resume = resume
        self.progress = progress
        self.lock: RunLock | None = None

    @property
    def spec_folder(self) -> Path:
        return self.workspace.ray_storage / self.spec.name

    def run(self, *, verbose: bool, address: str | None) -> RunSummary:
        spec = self.spec
        if self.command == "tune" and spec.tune is None:
            raise UserError("this spec has no tune section to run; add one (see examples/digits.yaml)")
        self.progress.stage("Checking the spec and data")
        planned = self.experiment.plan_features()
        self.experiment.check(planned, tune=self.command != "train")
        spec_hash, spec_flat = spec_fingerprint(self.experiment.spec_dump())
        try:
            record = self._resumable(planned, spec_hash, spec_flat) if self.resume else None
            check_address(address)
            if self.experiment.tracking_uri != self.workspace.default_tracking_uri:  # made on first use
                check_tracking_uri(self.experiment.tracking_uri)
            settings = RuntimeSettings.build(
                address=address, verbose=verbose, code_dirs=self.experiment.code_dirs
            )
            self.progress.stage("Starting Ray")
            # Opening (on first use, creating) the tracking store takes seconds; so does starting Ray.
            with ThreadPoolExecutor(max_workers=1) as pool:
                opening = pool.submit(self._open_tracker)
                runtime = start_ray(settings)
            try:
                tracker = opening.result()
                # Every check passed: from here on the run writes.
                feature_set = publish_feature_set(planned, self.workspace.feature_store)
                self.progress.feature_set(feature_set)
                if record is None:
                    record = self._new_run(planned, spec_hash, spec_flat)
                self._close_abandoned(tracker, record)
                return _Stages(self, feature_set, tracker, record).run()
            finally:
                stop_ray(runtime)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _open_tracker(self) -> MlflowTracker:
        uri = self.experiment.tracking_uri
        if uri == self.workspace.default_tracking_uri:
            self.workspace.root.mkdir(parents=True, exist_ok=True)
        return MlflowTracker(
            uri,
            self.spec.tracking.experiment or self.spec.name,
            self.workspace.artifact_root if uri.startswith("sqlite:") else None,
        )

    def _resumable(self, planned: PlannedFeatureSet, spec_hash: str, spec_flat: dict[str, Any]) -> RunRecord:
        """The run ``--resume`` continues, locked, after checking it is the same work."""
        marker = self.spec_folder / LATEST
        if not marker.exists():
            raise UserError(
                f"nothing to resume: '{self.spec.name}' has no earlier run in {self.workspace.root}"
            )
        run_name = marker.read_text().strip()
        folder = self.workspace.ray_storage / run_name
        record = RunRecord.load(folder)
        if record.status is Status.FINISHED:
            raise UserError(f"nothing to resume: run {run_name} finished; start a new run without --resume")
        if record.command != self.command:
            raise UserError(
                f"run {run_name} was started by `raylens {record.command}`; resume it with "
                f"`raylens {record.command} SPEC --resume`, or start a new `raylens {self.command}` run"
            )
        if record.spec_hash != spec_hash:
            changes = spec_changes(record.spec, spec_flat) or ["a credential in tracking.uri"]
            raise UserError(
                f"cannot resume {run_name}: the spec changed since it started: "
                + "; ".join(changes)
                + ". Undo the change to resume, or start a new run without --resume"
            )
        if record.source_fingerprint != planned.source_fingerprint:
            raise UserError(
                f"cannot resume {run_name}: the data of '{self.spec.data.source}' changed since it started "
                f"(fingerprint {record.source_fingerprint} → {planned.source_fingerprint}). "
                "Restore the data to resume, or start a new run without --resume"
            )
        if record.feature_set_version != planned.version:
            raise UserError(
                f"cannot resume {run_name}: the feature set is now version {planned.version}, the run "
                f"trained on {record.feature_set_version}; start a new run without --resume"
            )
        self.lock = RunLock(folder).acquire(run_name)  # last: a refused resume writes nothing
        return record

    def _new_run(self, planned: PlannedFeatureSet, spec_hash: str, spec_flat: dict[str, Any]) -> RunRecord:
        run_name = f"{self.spec.name}/{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
        folder = self.workspace.ray_storage / run_name
        self.lock = RunLock(folder).acquire(run_name)
        record = RunRecord(
            run_name, self.command, spec_hash, spec_flat, planned.source_fingerprint, planned.version
        )
        record.save(folder)
        (self.spec_folder / LATEST).write_text(run_name)
        return record

    def _close_abandoned(self, tracker: MlflowTracker, current: RunRecord) -> None:
        """Runs whose process died without a word (SIGKILL, OOM, a lost machine) are still
        RUNNING in MLflow: mark them KILLED. The resumed run's own leftovers too; the parts of it
        that go on are reopened as they do."""
        if self.resume:
            tracker.close_runs_tagged("raylens.run", current.run_name, status="KILLED")
        for folder, record in abandoned_runs(self.spec_folder):
            if record.run_name == current.run_name:
                continue
            tracker.close_runs_tagged("raylens.run", record.run_name, status="KILLED")
            record.status = Status.INTERRUPTED
            record.save(folder)


class _Stages:
    """The tracked stages of one run, sharing its feature set, tracker and record."""

    def __init__(
        self, invocation: _Invocation, feature_set: FeatureSet, tracker: MlflowTracker, record: RunRecord
    ) -> None:
        self.invocation = invocation
        self.spec = invocation.spec
        self.progress = invocation.progress
        self.feature_set = feature_set
        self.tracker = tracker
        self.record = record
        self.folder = invocation.workspace.ray_storage / record.run_name
        tags = {
            "raylens.version": raylens.__version__,
            "raylens.feature_set": feature_set.name,
            "raylens.feature_set_version": feature_set.version,
            "raylens.run": record.run_name,
        }
        commit = git_commit(invocation.experiment.base_dir)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        self.tags = tags

    def save(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.record, key, value)
        self.record.save(self.folder)

    def run(self) -> RunSummary:
        spec, record = self.spec, self.record
        if record.root_run_id is None:
            root = self.tracker.start_run(record.run_name, tags={**self.tags, "raylens.role": "experiment"})
            self.save(root_run_id=root)
            self.tracker.log_params(root, spec.model_dump(exclude={"tune"}))
            self.tracker.log_dict(root, yaml.safe_load(self.invocation.experiment.spec_text), "spec.yaml")
        else:
            root = record.root_run_id
            self.tracker.reopen_run(root)
            self.progress.notice(f"resuming run {record.run_name} (last finished stage: {record.stage})")
        self.save(status=Status.RUNNING)
        try:
            with self._ended_as(root):
                summary = RunSummary(
                    spec.name, record.run_name, self.feature_set, redact(self.tracker.tracking_uri), root
                )
                model_config, train_config = spec.model, spec.train
                if self.invocation.command != "train" and spec.tune is not None:
                    plan = self.sweep(root) if record.best_config is None else None
                    if plan is None:
                        self.progress.notice(
                            "the sweep finished before the interruption: using its best config"
                        )
                    assert record.best_config is not None
                    model_config, train_config = with_overrides(
                        model_config, train_config, record.best_config
                    )
                    summary = replace(
                        summary,
                        best_config=record.best_config,
                        best_metrics=record.best_metrics or {},
                        trials=len(record.trial_runs),
                        concurrency=plan,
                    )
                if self.invocation.command != "tune":
                    summary = replace(summary, final=self.train(root, model_config, train_config))
        except BaseException as exc:
            self.save(status=Status.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else Status.FAILED)
            raise
        self.save(status=Status.FINISHED)
        return summary

    @contextmanager
    def _ended_as(self, root: str) -> Iterator[None]:
        """The root run ends FINISHED, KILLED (interrupted) or FAILED, with the error kept."""
        try:
            yield
        except BaseException as exc:
            self.tracker.end_run(root, ended_status(exc))
            if not isinstance(exc, KeyboardInterrupt):
                self.tracker.set_tags(root, {"raylens.error": str(exc)[:4000]})
            raise
        self.tracker.end_run(root, "FINISHED")

    def sweep(self, root_run: str) -> ConcurrencyPlan:
        spec = self.spec
        assert spec.tune is not None
        self.progress.stage("Tuning")
        self.progress.sweep_started(spec.tune.trials)

        def remember(trial_id: str, run_id: str) -> None:
            self.record.trial_runs[trial_id] = run_id
            self.save()

        sweep: SweepResult = run_sweep(
            spec.tune,
            spec.model,
            spec.train,
            self.feature_set,
            tracker=self.tracker,
            parent_run_id=root_run,
            storage_path=self.folder,
            run_name="sweep",
            resume=self.invocation.resume,
            on_event=self.progress.trial,
            known_runs=dict(self.record.trial_runs),
            on_run_created=remember,
        )
        self.progress.sweep_finished()
        self.tracker.log_params(root_run, {f"best.{k}": v for k, v in sweep.best_config.items()})
        self.tracker.log_metrics(root_run, {f"best_{k}": v for k, v in sweep.best_metrics.items()})
        self.save(best_config=sweep.best_config, best_metrics=sweep.best_metrics, stage="tuned")
        return sweep.plan

    def train(self, root_run: str, model: ModelConfig, train: TrainConfig) -> TrainRunResult:
        spec = self.spec
        self.progress.stage("Training")
        self.progress.training_started(train.epochs, train.scaling.workers)
        params = {
            "data": spec.data.model_dump(),
            "features": spec.features.model_dump(),
            "model": model.model_dump(),
            "train": train.model_dump(),
        }
        final = train_and_record(
            TrainJob.for_feature_set(model, train, self.feature_set),
            self.feature_set,
            tracker=self.tracker,
            run_name="final",
            storage_path=self.folder,
            params=params,
            tags={**self.tags, "raylens.role": "final"},
            register_as=spec.tracking.register_as,
            parent_run_id=root_run,
            run_id=self.record.final_run_id,
            on_run_started=lambda run_id: self.save(final_run_id=run_id),
            on_epoch=self.progress.epoch,
            on_notice=self.progress.notice,
        )
        self.progress.training_finished()
        self.tracker.log_metrics(root_run, final.test_metrics)
        self.save(stage="trained")
        return final
