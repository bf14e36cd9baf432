"""Sweep tracking: every trial is an MLflow run nested under the sweep's run, written live by the
driver (the one writer), and closed with the status the trial ended in."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raylens.trainer.tracking import Tracker

METRIC_PREFIXES = ("train_", "valid_")


@dataclass(frozen=True)
class TrialEvent:
    """What happened to a trial: ``started``, ``result`` (an epoch), ``completed`` or ``failed``."""

    kind: str
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metrics the training loop reported, without Tune's bookkeeping fields."""
    return {
        k: float(v)
        for k, v in result.items()
        if (k == "epoch" or k.startswith(METRIC_PREFIXES)) and isinstance(v, int | float)
    }


class TrialRecorder:
    """Mirrors trials into nested MLflow runs and tells the front end; lives in the driver only."""

    def __init__(
        self,
        tracker: Tracker,
        parent_run_id: str,
        max_epochs: int,
        on_event: Callable[[TrialEvent], None] = lambda event: None,
        known_runs: Mapping[str, str] | None = None,
        on_run_created: Callable[[str, str], None] = lambda trial_id, run_id: None,
    ) -> None:
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self.on_event = on_event
        self.known_runs = dict(known_runs or {})
        """trial id → MLflow run id of trials an interrupted invocation of this sweep started."""
        self.on_run_created = on_run_created
        self.run_ids: dict[str, str] = {}
        self.last_epoch: dict[str, int] = {}

    def started(self, trial: Any) -> None:
        run_id = self.known_runs.get(trial.trial_id)
        if run_id is not None:
            # A trial of a resumed sweep goes on in its own run: same id, no duplicate epochs.
            self.tracker.reopen_run(run_id)
            logged = self.tracker.metric_history(run_id)
            self.last_epoch[trial.trial_id] = max((int(m.get("epoch", 0)) for m in logged), default=0)
        else:
            run_id = self.tracker.start_run(
                f"trial-{trial.trial_id}",
                parent_run_id=self.parent_run_id,
                tags={"raylens.role": "trial", "raylens.trial_id": trial.trial_id},
            )
            self.tracker.log_params(run_id, trial.config)
            self.known_runs[trial.trial_id] = run_id
            self.on_run_created(trial.trial_id, run_id)
        self.run_ids[trial.trial_id] = run_id
        self.on_event(TrialEvent("started", trial.trial_id, dict(trial.config)))

    def result(self, trial: Any, result: dict[str, Any]) -> None:
        metrics = trial_metrics(result)
        epoch = int(metrics.get("epoch", result.get("training_iteration", 0)))
        run_id = self.run_ids.get(trial.trial_id)
        if run_id and epoch > self.last_epoch.get(trial.trial_id, 0):  # one value per epoch
            self.tracker.log_metrics(run_id, metrics, step=epoch)
        self.last_epoch[trial.trial_id] = max(epoch, self.last_epoch.get(trial.trial_id, 0))
        self.on_event(TrialEvent("result", trial.trial_id, dict(trial.config), metrics))

    def completed(self, trial: Any) -> None:
        stopped_early = self.last_epoch.get(trial.trial_id, 0) < self.max_epochs
        self._close(trial, "FINISHED", {"raylens.stopped_early": str(stopped_early).lower()})
        metrics = trial_metrics(trial.last_result or {})
        self.on_event(TrialEvent("completed", trial.trial_id, dict(trial.config), metrics, stopped_early))

    def failed(self, trial: Any) -> None:
        """The trial's error stays with its run: a tag with its last line, the whole text as a file."""
        error = _error_text(trial)
        run_id = self.run_ids.get(trial.trial_id)
        if run_id and error:
            self.tracker.log_text(run_id, error, "error.txt")
        self._close(trial, "FAILED", {"raylens.error": error_line(error)[:4000]})
        self.on_event(TrialEvent("failed", trial.trial_id, dict(trial.config)))

    def _close(self, trial: Any, status: str, tags: dict[str, str]) -> None:
        run_id = self.run_ids.pop(trial.trial_id, None)
        if run_id:
            self.tracker.set_tags(run_id, tags)
            self.tracker.end_run(run_id, status)

    def close_open_runs(self, status: str = "KILLED") -> None:
        """Trials still open when the sweep stops: never leave a run RUNNING forever."""
        for run_id in self.run_ids.values():
            self.tracker.end_run(run_id, status)
        self.run_ids.clear()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_text(trial: Any) -> str:
    """The traceback Tune kept for a failed trial (its error file), or what it holds in memory,
    without the terminal colour codes Ray puts in it."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            return _ANSI.sub("", Path(path).read_text())
        except OSError:
            pass
    return _ANSI.sub("", str(getattr(trial, "error_msg", "") or ""))


def error_line(text: str) -> str:
    """What went wrong in a trial, in one line: the exception at the end of the traceback Ray
    wraps it in (Ray's first line only names the actor)."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


_RECORDERS: dict[str, TrialRecorder] = {}
"""Live recorders of this driver by sweep path. Tune pickles its callbacks with the sweep's state
and unpickles them on ``Tuner.restore``; the pickled callback keeps only the sweep path and
finds the resuming driver's recorder here."""


class SweepTracking(Callback):
    """The Tune callback (it runs in the driver) that forwards trial events to the recorder."""

    def __init__(self, sweep_path: str, recorder: TrialRecorder) -> None:
        self.sweep_path = sweep_path
        _RECORDERS[sweep_path] = recorder

    def __getstate__(self) -> dict[str, Any]:
        return {"sweep_path": self.sweep_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.sweep_path = state["sweep_path"]

    @property
    def recorder(self) -> TrialRecorder | None:
        return _RECORDERS.get(self.sweep_path)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.recorder:
            self.recorder.started(trial)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if self.recorder:
            self.recorder.result(trial, result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.recorder:
            self.recorder.completed(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.recorder:
            self.recorder.failed(trial)


def release(sweep_path: str) -> None:
    _RECORDERS.pop(sweep_path, None)
