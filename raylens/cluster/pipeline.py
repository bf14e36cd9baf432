"""``raylens pipeline SPEC``: from data to a production model, every step in one MLflow run.

    train (prepare → features → tune → train → evaluate → register)
    → gate (the new version against production on the same test rows)
    → staging (alias) → smoke (the version on Ray Serve answers HTTP as it answers offline)
    → production (alias: automatic, or with --approve)

The pipeline's MLflow run is the parent of the training run; each step's state is a tag of it
(``raylens.pipeline.step.<step>``), so ``--resume`` continues from the step that failed, and
``--approve --resume`` releases a version a manual-approval pipeline left at staging. A gate that
refuses the version ends the pipeline with production where it was.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from raylens.cluster.experiment import Experiment, NullProgress, Progress
from raylens.cluster.release import (
    Verdict,
    current_version,
    judge,
    latency_ms,
    model_outputs,
    move_alias,
)
from raylens.cluster.release_config import check_embedded_capacity
from raylens.errors import UserError

STEPS = ("train", "gate", "staging", "smoke", "production")
ROLE = "pipeline"
STEP_TAG = "raylens.pipeline.step.{step}"
STATE_TAG = "raylens.pipeline.state"
VERSION_TAG = "raylens.pipeline.version"
SPEC_TAG = "raylens.pipeline.spec"
GATED_AGAINST_TAG = "raylens.pipeline.gated_against"
RESUMABLE = ("failed", "interrupted", "running", "awaiting_approval")

RELEASED, STAGED, REJECTED, UNCHANGED = "released", "awaiting_approval", "rejected", "unchanged"


class ReleaseStopped(Exception):
    """A step found the version unfit to release (the smoke test disagreed with the model)."""


@dataclass(frozen=True)
class PipelineResult:
    run_id: str
    state: str
    """released, awaiting_approval (at staging), rejected (by the gate) or unchanged (the new
    model is the production one already)."""
    model: str
    version: str
    production: str | None
    """The version at production when the pipeline ended."""
    verdict: Verdict | None = None
    smoke_rows: int = 0


class Pipeline:
    """One ``raylens pipeline`` invocation over ``experiment``."""

    def __init__(
        self,
        experiment: Experiment,
        *,
        approve: bool = False,
        verbose: bool = False,
        address: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        name = experiment.spec.tracking.register_as
        if name is None:
            raise UserError(
                "tracking.register_as: a pipeline releases a registered model; name it, e.g. "
                f"tracking: {{register_as: {experiment.spec.name}}}"
            )
        self.experiment, self.name = experiment, name
        self.approve, self.verbose, self.address = approve, verbose, address
        self.progress = progress or NullProgress()
        self._tracker: Any = None
        self.run_id = ""
        self.tags: dict[str, str] = {}

    @property
    def tracker(self) -> Any:
        """The experiment's MLflow tracker, opened (a default store created) on first use."""
        if self._tracker is None:
            from raylens.cluster.invocation import open_tracker

            self._tracker = open_tracker(self.experiment)
        return self._tracker

    @property
    def client(self) -> Any:
        return self.tracker.client

    # ----- the run and its steps ---------------------------------------------------------------

    def run(self, *, resume: bool = False) -> PipelineResult:
        """Run the steps left. A fresh pipeline's MLflow run starts when the training has passed
        its checks: a mistake in the spec or data writes nothing."""
        if self.address is None:  # said before anything runs, not at the smoke test
            check_embedded_capacity(self.experiment.spec.serve)
        if resume:
            self.run_id, self.tags = self._resumable()
            self.tracker.reopen_run(self.run_id)
            self.progress.notice(f"resuming pipeline run {self.run_id}")
            self._tag(STATE_TAG, "running")
        try:
            result = self._steps(resume)
        except KeyboardInterrupt:
            self._ended("interrupted", "KILLED")
            raise
        except BaseException:
            self._ended("failed", "FAILED")
            raise
        self._ended(result.state, "FINISHED")
        return result

    def _start(self) -> str:
        """Start the pipeline's MLflow run (the training's parent)."""
        started = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.run_id = self.tracker.start_run(
            f"pipeline-{started}", tags={"raylens.role": ROLE, SPEC_TAG: self.experiment.spec.name}
        )
        self.tracker.log_dict(self.run_id, self.experiment.raw, "spec.yaml")
        self._tag(STATE_TAG, "running")
        self._tag(STEP_TAG.format(step="train"), "running")
        return self.run_id

    def _ended(self, state: str, status: str) -> None:
        if self.run_id:  # else nothing was written: the training's checks refused the input
            self._tag(STATE_TAG, state)
            self.tracker.end_run(self.run_id, status)

    def _steps(self, resume: bool) -> PipelineResult:
        version = self.tags.get(VERSION_TAG)
        if not self._done("train"):
            with self._step("train"):
                version = self._train(resume=resume and self._own_training_started())
                self._tag(VERSION_TAG, version)
        assert version is not None
        verdict = None
        if not self._done("gate"):
            with self._step("gate"):
                production = current_version(self.client, self.name, "production")
                if production == version:
                    self.progress.notice(
                        f"version {version} is production already (an identical model): nothing to release"
                    )
                    self._tag(STEP_TAG.format(step="gate"), "done")
                    return PipelineResult(self.run_id, UNCHANGED, self.name, version, production)
                verdict = self._gate(version, production)
                self._tag(GATED_AGAINST_TAG, production or "")
            if not verdict.passed:
                self.progress.notice(verdict.summary())
                return PipelineResult(self.run_id, REJECTED, self.name, version, production, verdict)
        if not self._done("staging"):
            with self._step("staging"):
                move_alias(
                    self.client,
                    self.name,
                    "staging",
                    version,
                    f"passed the gate in pipeline run {self.run_id}",
                )
        smoke_rows = 0
        if not self._done("smoke"):
            with self._step("smoke"):
                smoke_rows = self._smoke(version)
        manual = self.experiment.spec.release.approval == "manual"
        if manual and not self.approve:
            self.progress.notice(
                f"version {version} is at staging; release it with "
                "`raylens pipeline SPEC --resume --approve` "
                f"or `raylens promote {self.name} {version} --reason TEXT`"
            )
            production = current_version(self.client, self.name, "production")
            return PipelineResult(self.run_id, STAGED, self.name, version, production, verdict, smoke_rows)
        with self._step("production"):
            gated_against = self.tags.get(GATED_AGAINST_TAG, "") or None
            now = current_version(self.client, self.name, "production")
            if now != gated_against:
                raise UserError(
                    f"production moved since the gate judged version {version} (against "
                    f"{gated_against or 'no production'}; now version {now}): run the pipeline again "
                    "so the gate compares with what is in production"
                )
            how = "approved" if manual else "automatic"
            move_alias(
                self.client, self.name, "production", version, f"pipeline run {self.run_id} ({how} release)"
            )
        return PipelineResult(self.run_id, RELEASED, self.name, version, version, verdict, smoke_rows)

    @contextmanager
    def _step(self, step: str) -> Iterator[None]:
        self.progress.stage(f"pipeline: {step}")
        try:
            if self.run_id:  # (a fresh pipeline's run starts inside its train step)
                self._tag(STEP_TAG.format(step=step), "running")
            yield
        except BaseException as error:
            if self.run_id:
                state = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
                self._tag(STEP_TAG.format(step=step), state)
            raise
        self._tag(STEP_TAG.format(step=step), "done")

    def _tag(self, key: str, value: str) -> None:
        self.tags[key] = value
        self.tracker.set_tags(self.run_id, {key: value})

    def _state(self, step: str) -> str:
        return self.tags.get(STEP_TAG.format(step=step), "")

    def _done(self, step: str) -> bool:
        return self._state(step) == "done"

    def _resumable(self) -> tuple[str, dict[str, str]]:
        """The latest pipeline run of this spec that has steps left."""
        workspace = self.experiment.workspace
        if workspace.holds_no_store(self.experiment.tracking_uri):
            raise UserError(
                f"--resume: no pipeline of '{self.experiment.spec.name}' to resume: {workspace.root} "
                "holds no runs; run `raylens pipeline SPEC` without --resume (with the same --runs-dir)"
            )
        runs = self.client.search_runs(
            [self.tracker.experiment_id],
            filter_string=(
                f"tags.`raylens.role` = '{ROLE}' and tags.`{SPEC_TAG}` = '{self.experiment.spec.name}'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs or runs[0].data.tags.get(STATE_TAG) not in RESUMABLE:
            state = runs[0].data.tags.get(STATE_TAG) if runs else None
            raise UserError(
                f"--resume: no pipeline of '{self.experiment.spec.name}' to resume"
                + (f" (the latest one ended {state})" if state else "")
                + "; run `raylens pipeline SPEC` without --resume"
            )
        return runs[0].info.run_id, dict(runs[0].data.tags)

    # ----- what each step does -----------------------------------------------------------------

    def _own_training_started(self) -> bool:
        """Whether this pipeline's training run exists and is the spec's latest (what
        ``Experiment.run(resume=True)`` continues); ``UserError`` when another run of the spec came
        since. False: the training never started its run, so it starts afresh."""
        from raylens.cluster.runs import LATEST

        runs = self.client.search_runs(
            [self.tracker.experiment_id],
            filter_string=(
                f"tags.`mlflow.parentRunId` = '{self.run_id}' and tags.`raylens.role` = 'experiment'"
            ),
        )
        if not runs:
            return False
        marker = self.experiment.workspace.ray_storage / self.experiment.spec.name / LATEST
        latest = marker.read_text().strip() if marker.exists() else ""
        if latest != runs[0].data.tags.get("raylens.run"):
            raise UserError(
                f"--resume: the spec's latest run ({latest}) is not this pipeline's training "
                f"({runs[0].data.tags.get('raylens.run')}): another run of '{self.experiment.spec.name}' "
                "came since. Start a new pipeline: `raylens pipeline SPEC` without --resume"
            )
        return True

    def _train(self, *, resume: bool) -> str:
        summary = self.experiment.run(
            tune=self.experiment.spec.tune is not None,
            resume=resume,
            verbose=self.verbose,
            address=self.address,
            progress=self.progress,
            parent_run_id=self.run_id or self._start,
        )
        assert summary.final is not None and summary.final.registered_version is not None
        self.tracker.set_tags(self.run_id, {"raylens.pipeline.train_run": summary.final.run_id})
        return summary.final.registered_version

    def _gate(self, version: str, production: str | None) -> Verdict:
        from mlflow.exceptions import MlflowException

        from raylens.cluster.predict import load_model

        feature_set, rows, y = self._test_rows(version)
        candidate, size = self._candidate(version)
        release = self.experiment.spec.release
        production_outputs = None
        if production is not None:
            incumbent = load_model(f"models:/{self.name}/{production}", self.tracker.tracking_uri)
            try:
                production_outputs = model_outputs(incumbent, rows, feature_set.classes)
            except MlflowException as error:
                raise UserError(
                    f"the gate cannot score production version {production} on the new version's test "
                    f"rows ({error.message.splitlines()[0]}): the data's columns changed. Review version "
                    f"{version} and release it with `raylens promote {self.name} {version} --reason TEXT`"
                ) from None
        verdict = judge(
            release,
            feature_set.task,
            y,
            model_outputs(candidate, rows, feature_set.classes),
            production_outputs,
            latency_ms=latency_ms(candidate, rows) if release.max_latency_ms is not None else None,
            size_mb=size / 2**20,
            failed_rules=self._failed_rules(version),
        )
        if production is not None:
            trained_on = self.client.get_model_version(self.name, production).tags.get(
                "raylens.feature_set_version"
            )
            if trained_on != feature_set.version:
                verdict = replace(
                    verdict,
                    notes=(
                        f"production was trained on data version {trained_on}, the candidate on "
                        f"{feature_set.version}: some of these test rows may be rows production trained on",
                    ),
                )
        self.tracker.log_dict(self.run_id, verdict.to_dict(), "gate.json")
        metrics = {"gate_candidate": verdict.candidate_value}
        if verdict.comparison is not None:
            c = verdict.comparison
            metrics.update(
                gate_production=c.production, gate_improvement=c.improvement, gate_low=c.low, gate_high=c.high
            )
        self.tracker.log_metrics(self.run_id, metrics)
        outcome = "passed" if verdict.passed else "failed"
        self.tracker.set_tags(self.run_id, {"raylens.gate": outcome})
        self.client.set_model_version_tag(self.name, version, "raylens.gate", outcome)
        self.client.set_model_version_tag(
            self.name, version, "raylens.gate.summary", verdict.summary()[:5000]
        )
        self.client.set_model_version_tag(self.name, version, "raylens.pipeline_run", self.run_id)
        return verdict

    def _failed_rules(self, version: str) -> list[str]:
        """The debugger findings of ``version``'s training run whose rule's action is fail."""
        from raylens.trainer.debug.report import run_debug

        run_id = self.client.get_model_version(self.name, version).run_id
        if run_id is None:  # a version registered from files, not from a raylens run
            return []
        return [f.said() for f in run_debug(self.client, run_id).findings if f.action == "fail"]

    def _smoke(self, version: str) -> int:
        """Deploy ``version`` on Ray Serve, send it the test rows over HTTP, and check its answers
        are the offline model's, row for row."""
        from ray import serve

        from raylens.cluster.runtime import RuntimeSettings, start_ray, stop_ray
        from raylens.cluster.serving import ModelTarget, start_endpoint

        _, rows, _ = self._test_rows(version)
        offline, _ = self._candidate(version)
        expected = np.asarray(offline.predict(rows)).tolist()
        config = self.experiment.spec.serve.model_copy(update={"port": 0, "max_replicas": None})
        runtime = start_ray(RuntimeSettings.build(address=self.address, verbose=self.verbose))
        try:
            endpoint = start_endpoint(
                ModelTarget(self.name, version=version),
                self.tracker.tracking_uri,
                config,
                app="raylens-staging",
                route_prefix="/staging",
            )
            try:
                served = _predict_over_http(f"{endpoint.url}/predict", rows, config.max_request_rows)
            finally:
                serve.delete("raylens-staging")
        finally:
            stop_ray(runtime)  # an embedded cluster goes with Serve; on a cluster, Serve stays
        differ = _differing_rows(served, expected)
        self.tracker.log_metrics(self.run_id, {"smoke_rows": len(rows), "smoke_mismatches": len(differ)})
        if differ:
            raise ReleaseStopped(
                f"smoke test: the staged version {version} answered {len(differ)} of {len(rows)} test rows "
                f"over HTTP unlike the model offline (rows {differ[:5]}); production is unchanged"
            )
        self.progress.notice(f"smoke test: {len(rows)} test rows over HTTP equal the offline predictions")
        return len(rows)

    @functools.cache  # noqa: B019 - one pipeline, a few versions: the gate and smoke test share them
    def _test_rows(self, version: str) -> tuple[Any, Any, np.ndarray]:
        """The feature set ``version`` was trained on, its test rows as the source had them, and
        their targets: read once for the gate and the smoke test."""
        from raylens.features.drift import raw_rows

        feature_set = self._feature_set(version)
        rows, y = raw_rows(feature_set, "test")
        if not len(rows):
            raise UserError("data.split.test: the test split has no rows; the gate and smoke test need some")
        return feature_set, rows, y

    @functools.cache  # noqa: B019
    def _candidate(self, version: str) -> tuple[Any, int]:
        """The registered pyfunc model of ``version`` and its size in bytes, loaded once."""
        from raylens.cluster.predict import load_model_sized

        return load_model_sized(f"models:/{self.name}/{version}", self.tracker.tracking_uri)

    def _feature_set(self, version: str) -> Any:
        """The feature-set version ``version`` of the model was trained on (its lineage tags)."""
        from raylens.features import open_feature_set

        tags = self.client.get_model_version(self.name, version).tags
        return open_feature_set(
            self.experiment.workspace.feature_store,
            tags.get("raylens.feature_set", self.experiment.spec.name),
            tags["raylens.feature_set_version"],
        )


def records_of(frame: Any) -> list[dict[str, Any]]:
    """A frame's rows as JSON records, every float exact (pandas' own JSON rounds to 10 digits),
    a missing value null."""
    return [{k: _json_value(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _json_value(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _differing_rows(served: list[Any], expected: list[Any]) -> list[int]:
    """Rows whose answers differ: labels exactly; values (a regression's) beyond float32 rounding,
    as the same rows scored in batches of another size may differ in their last bits."""
    differ = []
    for i, (got, want) in enumerate(zip(served, expected, strict=True)):
        if isinstance(got, float) and isinstance(want, float):
            if not np.isclose(got, want, rtol=1e-5, atol=1e-6):
                differ.append(i)
        elif got != want:
            differ.append(i)
    return differ


def _predict_over_http(url: str, rows: Any, chunk: int) -> list[Any]:
    predictions: list[Any] = []
    for start in range(0, len(rows), chunk):
        part = rows.iloc[start : start + chunk]
        body = json.dumps({"dataframe_records": records_of(part)}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                predictions.extend(json.loads(response.read())["predictions"])
        except urllib.error.HTTPError as error:
            raise ReleaseStopped(
                f"smoke test: the staged model answered HTTP {error.code} ({error.read()[:300]!r}); "
                "production is unchanged"
            ) from None
    return predictions
