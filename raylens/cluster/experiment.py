"""The experiment: one spec driven through the whole phase.

    prepare → features → (tune) → train → evaluate → register

``Experiment.from_yaml(path).run()`` is what ``raylens run`` calls; notebooks and tests call it
too. Each stage is a function of a lower package; this module only composes them and keeps
the run's MLflow tree: one root run per invocation, the sweep's trials and the final training
run nested under it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

import raylens
from raylens.cluster.runtime import start_ray, stop_ray
from raylens.cluster.spec import ExperimentSpec, load_spec
from raylens.cluster.workspace import Workspace
from raylens.errors import UserError
from raylens.features import FeatureSet, build_feature_set
from raylens.trainer import ModelConfig, TrainConfig, TrainJob
from raylens.trainer.run import TrainRunResult, train_and_record
from raylens.trainer.tracking import MlflowTracker, git_commit
from raylens.tuning import ConcurrencyPlan, with_overrides
from raylens.tuning.sweep import SweepResult, run_sweep

LATEST = "LATEST"


class Progress(Protocol):
    """What a front end (the CLI's progress bars) hears about a run."""

    def stage(self, title: str) -> None: ...
    def feature_set(self, feature_set: FeatureSet) -> None: ...
    def sweep_started(self, trials: int) -> None: ...
    def trial(self, event: Any) -> None: ...
    def sweep_finished(self) -> None: ...
    def training_started(self, epochs: int, workers: int) -> None: ...
    def epoch(self, metrics: dict[str, float]) -> None: ...
    def training_finished(self) -> None: ...


class NullProgress:
    def stage(self, title: str) -> None: ...
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


@dataclass(frozen=True)
class Experiment:
    spec: ExperimentSpec
    spec_text: str
    base_dir: Path
    workspace: Workspace

    @classmethod
    def from_yaml(cls, path: str | Path, runs_dir: Path | None = None) -> Experiment:
        path = Path(path)
        spec = load_spec(path)
        return cls(spec, path.read_text(), path.resolve().parent, Workspace.at(runs_dir))

    @property
    def tracking_uri(self) -> str:
        return self.workspace.tracking_uri(self.spec.tracking.uri)

    def build_features(self) -> FeatureSet:
        """Run the data prepare and feature pipelines; the version is reused when unchanged."""
        return build_feature_set(
            self.spec.name, self.spec.data, self.spec.features, self.workspace.feature_store, self.base_dir
        )

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
        the sweep. ``resume`` continues the latest run of this spec from its checkpoints."""
        progress = progress or NullProgress()
        spec = self.spec
        if not train and spec.tune is None:
            raise UserError("this spec has no tune section to run; add one (see examples/digits.yaml)")
        progress.stage("Building features")
        feature_set = self.build_features()
        progress.feature_set(feature_set)
        run_name = self._run_name(resume)
        self.workspace.ensure()
        progress.stage("Starting Ray")
        # Opening (on first use, creating) the tracking store takes seconds; so does starting Ray.
        with ThreadPoolExecutor(max_workers=1) as pool:
            opening = pool.submit(
                MlflowTracker,
                self.tracking_uri,
                spec.tracking.experiment or spec.name,
                self.workspace.artifact_root if self.tracking_uri.startswith("sqlite:") else None,
            )
            runtime = start_ray(address=address, verbose=verbose, code_dirs=[self.base_dir, Path.cwd()])
        try:
            tracker = opening.result()
            tags = {
                "raylens.version": raylens.__version__,
                "raylens.feature_set": feature_set.name,
                "raylens.feature_set_version": feature_set.version,
                "raylens.run": run_name,
            }
            commit = git_commit(self.base_dir)
            if commit:
                tags["mlflow.source.git.commit"] = commit
            stage = _Stages(self, feature_set, tracker, tags, run_name, resume, progress)
            if resume:
                # The interrupted attempt's driver died before it could close its runs.
                tracker.close_runs_tagged("raylens.run", run_name, status="KILLED")
            root_run = tracker.start_run(run_name, tags={**tags, "raylens.role": "experiment"})
            try:
                tracker.log_params(root_run, spec.model_dump(exclude={"tune"}))
                tracker.log_dict(root_run, yaml.safe_load(self.spec_text), "spec.yaml")
                summary = RunSummary(spec.name, run_name, feature_set, self.tracking_uri, root_run)
                model_config, train_config = spec.model, spec.train
                if tune and spec.tune is not None:
                    sweep = stage.sweep(root_run)
                    model_config, train_config = with_overrides(model_config, train_config, sweep.best_config)
                    summary = replace(
                        summary,
                        best_config=sweep.best_config,
                        best_metrics=sweep.best_metrics,
                        trials=len(sweep.trials),
                        concurrency=sweep.plan,
                    )
                if train:
                    summary = replace(summary, final=stage.train(root_run, model_config, train_config))
                tracker.end_run(root_run, "FINISHED")
            except BaseException as exc:
                tracker.end_run(root_run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
                raise
        finally:
            stop_ray(runtime)
        return summary

    def _run_name(self, resume: bool) -> str:
        """A new run folder per invocation; ``resume`` reuses the latest one of this spec."""
        marker = self.workspace.ray_storage / self.spec.name / LATEST
        if resume:
            if not marker.exists():
                raise UserError(
                    f"nothing to resume: '{self.spec.name}' has no earlier run in {self.workspace.root}"
                )
            return marker.read_text().strip()
        run_name = f"{self.spec.name}/{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(run_name)
        return run_name


@dataclass(frozen=True)
class _Stages:
    """The tracked stages of one run, sharing its feature set, tracker and tags."""

    experiment: Experiment
    feature_set: FeatureSet
    tracker: MlflowTracker
    tags: dict[str, str]
    run_name: str
    resume: bool
    progress: Progress

    @property
    def storage(self) -> Path:
        return self.experiment.workspace.ray_storage / self.run_name

    def sweep(self, root_run: str) -> SweepResult:
        spec = self.experiment.spec
        assert spec.tune is not None
        self.progress.stage("Tuning")
        self.progress.sweep_started(spec.tune.trials)
        sweep = run_sweep(
            spec.tune,
            spec.model,
            spec.train,
            self.feature_set,
            tracker=self.tracker,
            parent_run_id=root_run,
            storage_path=self.storage,
            run_name="sweep",
            resume=self.resume,
            on_event=self.progress.trial,
        )
        self.progress.sweep_finished()
        self.tracker.log_params(root_run, {f"best.{k}": v for k, v in sweep.best_config.items()})
        self.tracker.log_metrics(root_run, {f"best_{k}": v for k, v in sweep.best_metrics.items()})
        return sweep

    def train(self, root_run: str, model: ModelConfig, train: TrainConfig) -> TrainRunResult:
        spec = self.experiment.spec
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
            storage_path=self.storage,
            params=params,
            tags={**self.tags, "raylens.role": "final"},
            register_as=spec.tracking.register_as,
            parent_run_id=root_run,
            on_epoch=self.progress.epoch,
        )
        self.progress.training_finished()
        self.tracker.log_metrics(root_run, final.test_metrics)
        return final
