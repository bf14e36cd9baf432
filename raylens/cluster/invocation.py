"""Running an experiment: one invocation's run record, lock, tracker, and its tracked stages.

Order matters for "nothing written on bad input": everything that can be checked in the driver
is checked first (``Experiment.validate``: spec, data, the model on a real batch, the sweep's
metric, the Ray address, the tracking store; then the resumed run's spec and data); only then are
the feature set, the run folder and MLflow runs written.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

import yaml

import raylens
from raylens.cluster.experiment import Experiment, Progress, RunSummary
from raylens.cluster.resources import resource_shortfall
from raylens.cluster.runs import (
    LATEST,
    RunLock,
    RunRecord,
    Status,
    abandoned_runs,
    spec_changes,
    spec_fingerprint,
)
from raylens.cluster.runtime import RayRuntime, RuntimeSettings, needs_ray, start_ray, stop_ray
from raylens.cluster.spec import best_spec
from raylens.errors import UserError
from raylens.features import FeatureSet, PlannedFeatureSet, publish_feature_set
from raylens.storage import Location
from raylens.trainer import AnyModelConfig, TorchModelConfig, TrainConfig, TrainJob
from raylens.trainer.debug.report import RunDebug, TrialDebug, run_debug, sweep_debug
from raylens.trainer.family import family_of
from raylens.trainer.run import TrainRunResult, train_and_record
from raylens.trainer.tracking import MlflowTracker, ended_status, git_commit, redact
from raylens.tuning import with_overrides
from raylens.tuning.candidates import EarlierTrial
from raylens.tuning.leaderboard import LEADERBOARD, Leaderboard
from raylens.tuning.sweep import SweepResult, run_sweep

NO_RAY = RayRuntime(started_here=False, cpus=0.0, address=None)
"""The runtime of an invocation that needs no Ray (``train`` of one CPU worker, embedded)."""

BEST_SPEC = "best.yaml"
"""The sweep's best configuration as a spec ``raylens train`` takes, in the run folder and MLflow."""
BEST_CONFIG = "best_config.json"
"""The best configuration alone (dotted paths to values), read by ``raylens train --best-from``."""


def best_config_of(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """The best configuration the sweep of MLflow run ``run_id`` (its root run) found."""
    return dict(_sweep_artifact(tracking_uri, run_id, BEST_CONFIG, "best configuration", "--best-from: "))


def leaderboard_of_run(tracking_uri: str, run_id: str) -> Leaderboard:
    """The leaderboard the sweep of MLflow run ``run_id`` (its root run) logged."""
    return Leaderboard.from_dict(_sweep_artifact(tracking_uri, run_id, LEADERBOARD, "leaderboard"))


def debug_of_run(tracking_uri: str, run_id: str) -> RunDebug:
    """The debugger's record of MLflow run ``run_id`` (a training run or a sweep's trial)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    _run_of(client, tracking_uri, run_id)
    return run_debug(client, run_id)


def debug_of_sweep(tracking_uri: str, run_id: str) -> list[TrialDebug]:
    """The debugger's findings in each trial of the sweep whose root run is ``run_id``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run = _run_of(client, tracking_uri, run_id)
    trials = sweep_debug(client, run.info.experiment_id, run_id)
    if not trials:
        raise UserError(
            f"run '{run_id}' has no trials (it is not the root run of a sweep); give the 'sweep run "
            "id' that `raylens tune` or `raylens run` printed, or drop --sweep for a training run"
        )
    return trials


def _run_of(client: Any, tracking_uri: str, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"no MLflow run '{run_id}' in {redact(tracking_uri)}; give a run id that `raylens train`, "
            "`raylens tune` or `raylens run` printed, with the same --runs-dir"
        ) from None


RUN_ID = re.compile(r"[0-9a-f]{32}")
"""What an MLflow run id looks like (a tracking server's or SQLite store's)."""


def latest_sweep(tracking_uri: str, run_or_experiment: str) -> str:
    """``run_or_experiment`` itself when it is a run id, else the run id of the latest finished
    sweep (a root run with a leaderboard) of the MLflow experiment of that name."""
    if RUN_ID.fullmatch(run_or_experiment):
        return run_or_experiment
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(run_or_experiment)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(
            f"tune.warm_start: '{run_or_experiment}' is neither a run id nor an MLflow experiment in "
            f"{redact(tracking_uri)}; give a sweep run id, or one of the experiments: {', '.join(names)}"
        )
    roots = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`raylens.role` = 'experiment' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in roots:
        if any(f.path == LEADERBOARD for f in client.list_artifacts(run.info.run_id)):
            return str(run.info.run_id)
    raise UserError(
        f"tune.warm_start: experiment '{run_or_experiment}' holds no finished sweep; run "
        "`raylens tune` first, or give a sweep run id"
    )


def _sweep_artifact(tracking_uri: str, run_id: str, artifact: str, what: str, said: str = "") -> Any:
    """A JSON artifact a finished sweep logged to its root run ``run_id``; ``UserError`` naming
    what to pass instead when there is no such run or artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from raylens.trainer.tracking import redact

    try:
        run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException:
        raise UserError(
            f"{said}no MLflow run '{run_id}' in {redact(tracking_uri)}; give the id of a sweep's "
            "run (the 'sweep run id' row of `raylens tune` or `raylens run`), with the same --runs-dir"
        ) from None
    try:
        return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{artifact}")
    except Exception:  # no such artifact: each artifact store says so its own way
        raise UserError(
            f"{said}run '{run_id}' holds no {what} (it is not "
            "the root run of a finished sweep); give the 'sweep run id' that `raylens tune` or "
            "`raylens run` printed"
        ) from None


def open_tracker(experiment: Experiment) -> MlflowTracker:
    """The MLflow tracker of ``experiment``'s runs (its run folder made for a default store)."""
    uri, workspace = experiment.tracking_uri, experiment.workspace
    if uri == workspace.default_tracking_uri:
        workspace.root.mkdir()
    return MlflowTracker(
        uri,
        experiment.spec.tracking.experiment or experiment.spec.name,
        workspace.artifact_root if uri.startswith("sqlite:") and workspace.root.local else None,
    )


class Invocation:
    """One call of ``Experiment.run``: its run record, lock, tracker and stages."""

    def __init__(
        self,
        experiment: Experiment,
        command: str,
        resume: bool,
        progress: Progress,
        parent_run_id: str | Callable[[], str] | None = None,
    ) -> None:
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        """The MLflow run this invocation's root run is nested under (a pipeline's)."""
        self.spec = experiment.spec
        self.workspace = experiment.workspace
        self.command = command
        self.resume = resume
        self.progress = progress
        self.lock: RunLock | None = None
        self.warm_start: list[EarlierTrial] | None = None

    def _warm_start(self) -> list[EarlierTrial] | None:
        """The finished trials of the sweep ``tune.warm_start`` names, read before anything is
        written: ``UserError`` when there is no such sweep or it optimized another metric."""
        tune = self.spec.tune
        if tune is None or tune.warm_start is None:
            return None
        uri = self.experiment.tracking_uri
        if self.workspace.holds_no_store(uri):
            raise UserError(
                f"tune.warm_start: no MLflow run '{tune.warm_start}': {self.workspace.root} holds no "
                "tracking store yet; give the sweep run id of an earlier sweep, with the same --runs-dir"
            )
        sweep = latest_sweep(uri, tune.warm_start)
        board = _sweep_artifact(uri, sweep, LEADERBOARD, "leaderboard", "tune.warm_start: ")
        earlier = Leaderboard.from_dict(board)
        if earlier.metric != tune.metric:
            raise UserError(
                f"tune.warm_start: sweep {tune.warm_start} optimized {earlier.metric}, this one "
                f"{tune.metric}; scores of different metrics cannot seed the search"
            )
        return [EarlierTrial(row.candidate, row.config, row.score) for row in earlier.rows]

    @property
    def spec_folder(self) -> Location:
        return self.workspace.ray_storage / self.spec.name

    def run(self, *, verbose: bool, address: str | None) -> RunSummary:
        spec = self.spec
        if self.command == "tune" and spec.tune is None:
            raise UserError("this spec has no tune section to run; add one (see examples/digits.yaml)")
        self.progress.stage("Checking the spec and data")
        try:
            report = self.experiment.validate(
                tune=self.command != "train", address=address, rows_done=self.progress.data_rows
            )
        finally:
            self.progress.data_finished()
        report.raise_problems()
        planned = report.planned
        assert planned is not None
        self.warm_start = self._warm_start() if self.command != "train" else None
        spec_hash, spec_flat = spec_fingerprint(self.experiment.spec_dump())
        try:
            record = self._resumable(planned, spec_hash, spec_flat) if self.resume else None
            settings = RuntimeSettings.build(
                address=address, verbose=verbose, code_dirs=self.experiment.code_dirs
            )
            # `train` of one CPU worker, embedded, trains in this process: no Ray to start (seconds).
            scaling = self.spec.train.scaling
            one_worker = scaling.max_workers == 1 or (address is None and self._auto_trains_in_one(planned))
            with_ray = needs_ray(
                self.command,
                self.spec.train,
                address=address,
                one_worker=one_worker,
                local_storage=self.workspace.root.local,
            )
            if with_ray:
                self.progress.stage("Starting Ray")
            # Opening (on first use, creating) the tracking store takes seconds; so does starting Ray.
            with ThreadPoolExecutor(max_workers=1) as pool:
                opening = pool.submit(self._open_tracker)
                runtime = start_ray(settings) if with_ray else NO_RAY
            try:
                self._check_resources(runtime)
                tracker = opening.result()
                # Every check passed: from here on the run writes.
                feature_set = publish_feature_set(planned, self.workspace.feature_store)
                self.progress.feature_set(feature_set)
                if record is None:
                    record = self._new_run(planned, spec_hash, spec_flat)
                self._close_abandoned(tracker, record)
                embedded = runtime.embedded or runtime is NO_RAY
                return Stages(self, feature_set, tracker, record, embedded=embedded).run()
            finally:
                stop_ray(runtime)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _check_resources(self, runtime: RayRuntime) -> None:
        """On a cluster given by --address, say what the run asks beyond what the cluster has now:
        its autoscaler may add the nodes, so the run goes on. (The embedded cluster's size is
        known before it starts: ``Experiment.validate`` refuses such a run.)"""
        import ray

        if runtime.embedded or runtime is NO_RAY:
            return
        total = ray.cluster_resources()
        short = resource_shortfall(
            self.spec.train,
            self.spec.tune if self.command != "train" else None,
            cpus=float(total.get("CPU", 0)),
            gpus=float(total.get("GPU", 0)),
            trains=self.command != "tune",
        )
        if short is not None:
            self.progress.notice(f"{short}: Ray waits until the cluster has them (if it autoscales)")

    def _open_tracker(self) -> MlflowTracker:
        return open_tracker(self.experiment)

    def _auto_trains_in_one(self, planned: PlannedFeatureSet) -> bool:
        """Whether ``auto`` trains the spec's several CPU workers as one process on this machine
        (``raylens.trainer.torch_family.node_layout``, which decides the same for the run); a
        family other than torch fits in one process."""
        import torch

        from raylens.trainer import build_model
        from raylens.trainer.parallel.plan import one_process_reason, worker_memory

        scaling = self.spec.train.scaling
        if not isinstance(self.spec.model, TorchModelConfig):
            return True
        if scaling.strategy != "auto" or scaling.use_gpu or not isinstance(scaling.workers, int):
            return False
        model = build_model(self.spec.model, planned.sample(0).shape[1], planned.num_outputs)
        parameters = sum(p.numel() for p in model.parameters())
        memory = worker_memory(torch.device("cpu"), 1)
        cpus = scaling.workers * scaling.cpus_per_worker
        return one_process_reason(scaling.workers, cpus, parameters, memory) is not None

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
        here = socket.gethostname()
        if not folder.local and record.status is Status.RUNNING and record.host not in ("", here):
            # Object storage holds no lock another host can see (runs.RunLock): the record is all.
            raise UserError(
                f"run {run_name} is running on {record.host}, as far as its record says; a run folder "
                f"on object storage cannot tell whether that process still lives. Resume it on "
                f"{record.host}, or start a new run without --resume"
            )
        record = replace(record, host=here)
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
            run_name,
            self.command,
            spec_hash,
            spec_flat,
            planned.source_fingerprint,
            planned.version,
            host=socket.gethostname(),
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


class Stages:
    """The tracked stages of one run, sharing its feature set, tracker and record."""

    def __init__(
        self,
        invocation: Invocation,
        feature_set: FeatureSet,
        tracker: MlflowTracker,
        record: RunRecord,
        *,
        embedded: bool = False,
    ) -> None:
        self.invocation = invocation
        self.embedded = embedded
        """Ray is a cluster of this machine alone, started for this run: the final training of
        one CPU worker runs in this process (no Ray Train worker group to start)."""
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
            parent = self.invocation.parent_run_id
            root = self.tracker.start_run(
                record.run_name,
                parent_run_id=parent() if callable(parent) else parent,
                tags={**self.tags, "raylens.role": "experiment"},
            )
            self.save(root_run_id=root)
            self.tracker.log_params(root, spec.model_dump(exclude={"tune"}))
            self.tracker.log_dict(root, self.invocation.experiment.raw, "spec.yaml")
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
                    swept = self.sweep(root) if record.best_config is None else None
                    if swept is None:
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
                        concurrency=swept.plan if swept else None,
                        leaderboard=swept.leaderboard if swept else None,
                        best_spec=(self.folder / BEST_SPEC).native,
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

    def sweep(self, root_run: str) -> SweepResult:
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
            warm_start=self.invocation.warm_start,
            on_notice=self.progress.notice,
        )
        self.progress.sweep_finished()
        self.tracker.log_params(root_run, {f"best.{k}": v for k, v in sweep.best_config.items()})
        self.tracker.log_metrics(root_run, {f"best_{k}": v for k, v in sweep.best_metrics.items()})
        # The hand-off to `raylens train`: the spec with the best configuration written in (kept
        # with the run and in MLflow), and the configuration alone, exact, for --best-from.
        best = best_spec(self.invocation.experiment.raw, sweep.best_config)
        (self.folder / BEST_SPEC).write_text(yaml.safe_dump(best, sort_keys=False))
        self.tracker.log_dict(root_run, best, BEST_SPEC)
        self.tracker.log_dict(root_run, sweep.best_config, BEST_CONFIG)
        self.save(best_config=sweep.best_config, best_metrics=sweep.best_metrics, stage="tuned")
        return sweep

    def train(self, root_run: str, model: AnyModelConfig, train: TrainConfig) -> TrainRunResult:
        spec = self.spec
        self.progress.stage("Training")
        job, layout = family_of(model).layout(
            TrainJob.for_feature_set(model, train, self.feature_set), embedded=self.embedded
        )
        self.progress.training_started(train.epochs, job.train.scaling.max_workers, layout)
        params = {
            "data": spec.data.model_dump(),
            "features": spec.features.model_dump(),
            "model": model.model_dump(),
            "train": train.model_dump(),
        }
        final = train_and_record(
            job,
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
            embedded=self.embedded,
            layout=layout,
        )
        self.progress.training_finished()
        self.tracker.log_metrics(root_run, final.test_metrics)
        self.save(stage="trained")
        return final
