"""Sweep tracking: every trial is an MLflow run nested under the sweep's run, written live by the
driver (the one writer), and closed with the status the trial ended in."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from raylens.trainer.debug.report import read_debug, record_debug
from raylens.trainer.family import stopped_by_rule
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
    reached_goal: bool = False
    """For ``completed``: its last result met tune.goal, which ended the sweep there."""
    error: str = ""
    """For ``failed``: what went wrong, in one line (the whole traceback is in its run)."""


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The metrics the training loop reported, without Tune's bookkeeping fields."""
    return {
        k: float(v)
        for k, v in result.items()
        if (k == "epoch" or k.startswith(METRIC_PREFIXES)) and isinstance(v, int | float)
    }


@dataclass(frozen=True)
class TrialNote:
    """A trial event as plain values, as the sweep's callback sends it to the recorder: from the
    same process, or (through Ray Client, where Tune's loop runs on the cluster) over a queue."""

    kind: str
    """started, result, completed, failed, or ended (Tune ended it with the sweep, at a goal or a
    spent time budget: completed where it stood)"""
    trial_id: str
    config: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)
    """The reported result; for ``completed``, the last one."""
    error: str = ""
    debug: dict[str, bytes] = field(default_factory=dict)
    """For ``completed`` and ``failed``: the debugger's files in the trial's latest checkpoint."""

    @classmethod
    def of(cls, kind: str, trial: Any, result: dict[str, Any] | None = None) -> TrialNote:
        if kind in ("completed", "ended"):
            result = trial.last_result
        debug = {}
        checkpoint = getattr(trial, "checkpoint", None) if kind in ("completed", "ended", "failed") else None
        if checkpoint is not None:
            debug = read_debug(checkpoint.path, checkpoint.filesystem)
        return cls(
            kind,
            trial.trial_id,
            dict(trial.config),
            dict(result or {}),
            _error_text(trial) if kind == "failed" else "",
            debug,
        )


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
        describe: Callable[[dict[str, Any]], dict[str, str]] = lambda config: {},
        reaches_goal: Callable[[Mapping[str, Any]], bool] = lambda result: False,
    ) -> None:
        self.tracker = tracker
        self.reaches_goal = reaches_goal
        self.describe = describe
        """Tags of a trial's run from its configuration (its candidate, family and model)."""
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self.on_event = on_event
        self.known_runs = dict(known_runs or {})
        """trial id → MLflow run id of trials an interrupted invocation of this sweep started."""
        self.on_run_created = on_run_created
        self.run_ids: dict[str, str] = {}
        self.last_epoch: dict[str, int] = {}
        self.ended_by_sweep: set[str] = set()
        """Trials the sweep's end stopped where they stood (a goal met, a time budget spent)."""

    def record(self, note: TrialNote) -> None:
        handlers = {
            "started": self._started,
            "result": self._result,
            "completed": self._completed,
            "ended": self._ended,
            "failed": self._failed,
        }
        handlers[note.kind](note)

    def _started(self, note: TrialNote) -> None:
        run_id = self.known_runs.get(note.trial_id)
        if run_id is not None:
            # A trial of a resumed sweep goes on in its own run: same id, no duplicate epochs.
            self.tracker.reopen_run(run_id)
            logged = self.tracker.metric_history(run_id)
            self.last_epoch[note.trial_id] = max((int(m.get("epoch", 0)) for m in logged), default=0)
        else:
            run_id = self.tracker.start_run(
                f"trial-{note.trial_id}",
                parent_run_id=self.parent_run_id,
                tags={
                    "raylens.role": "trial",
                    "raylens.trial_id": note.trial_id,
                    **self.describe(note.config),
                },
            )
            self.tracker.log_params(run_id, note.config)
            self.known_runs[note.trial_id] = run_id
            self.on_run_created(note.trial_id, run_id)
        self.run_ids[note.trial_id] = run_id
        self.on_event(TrialEvent("started", note.trial_id, note.config))

    def _result(self, note: TrialNote) -> None:
        metrics = trial_metrics(note.result)
        epoch = int(metrics.get("epoch", note.result.get("training_iteration", 0)))
        run_id = self.run_ids.get(note.trial_id)
        if run_id and epoch > self.last_epoch.get(note.trial_id, 0):  # one value per epoch
            self.tracker.log_metrics(run_id, metrics, step=epoch)
        self.last_epoch[note.trial_id] = max(epoch, self.last_epoch.get(note.trial_id, 0))
        self.on_event(TrialEvent("result", note.trial_id, note.config, metrics))

    def _completed(self, note: TrialNote) -> None:
        reached_goal = self.reaches_goal(note.result)  # it ends there, and is not stopped early
        stopped_early = self.last_epoch.get(note.trial_id, 0) < self.max_epochs and not reached_goal
        self._record_debug(note)
        tags = {"raylens.stopped_early": str(stopped_early).lower()}
        if reached_goal:
            tags["raylens.reached_goal"] = "true"
        self._close(note.trial_id, "FINISHED", tags)
        metrics = trial_metrics(note.result)
        self.on_event(
            TrialEvent("completed", note.trial_id, note.config, metrics, stopped_early, reached_goal)
        )

    def _ended(self, note: TrialNote) -> None:
        self.ended_by_sweep.add(note.trial_id)
        self._completed(note)

    def _record_debug(self, note: TrialNote, stopped_by: str | None = None) -> None:
        run_id = self.run_ids.get(note.trial_id)
        if run_id and (note.debug or stopped_by):
            record_debug(self.tracker, run_id, note.debug, stopped_by)

    def _failed(self, note: TrialNote) -> None:
        """The trial's error stays with its run: a tag with its last line, the whole text as a
        file. A trial a debugger rule stopped is no failure: its run ends FINISHED, stopped early,
        the rule's finding its ``raylens.stopped_by`` tag."""
        stopped_by = stopped_by_rule(note.error)
        if stopped_by is not None:
            self._record_debug(note, stopped_by)
            self._close(
                note.trial_id,
                "FINISHED",
                {"raylens.stopped_early": "true", "raylens.stopped_by": stopped_by[:4000]},
            )
            self.on_event(TrialEvent("completed", note.trial_id, note.config, {}, True))
            return
        self._record_debug(note)
        run_id = self.run_ids.get(note.trial_id)
        if run_id and note.error:
            self.tracker.log_text(run_id, note.error, "error.txt")
        self._close(note.trial_id, "FAILED", {"raylens.error": error_line(note.error)[:4000]})
        self.on_event(TrialEvent("failed", note.trial_id, note.config, error=error_line(note.error)))

    def _close(self, trial_id: str, status: str, tags: dict[str, str]) -> None:
        run_id = self.run_ids.pop(trial_id, None)
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


def relay_name(sweep_path: str) -> str:
    """The named queue that brings a sweep's trial events to its driver through Ray Client. Named
    after the sweep, so the callback Tune restores from the sweep's saved state finds the queue
    of the driver resuming it."""
    return "raylens-trial-events-" + hashlib.sha256(sweep_path.encode()).hexdigest()[:16]


class SweepTracking(Callback):
    """The Tune callback that forwards trial events to the driver's recorder: directly when Tune's
    loop runs in the driver, else over the sweep's named queue (``relay_name``: through Ray
    Client the loop runs on the cluster)."""

    def __init__(self, sweep_path: str, recorder: TrialRecorder) -> None:
        self.sweep_path = sweep_path
        self._relay: Any = None
        self._running: set[str] = set()
        _RECORDERS[sweep_path] = recorder

    def __getstate__(self) -> dict[str, Any]:
        return {"sweep_path": self.sweep_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.sweep_path = state["sweep_path"]
        self._relay = None
        self._running = set()

    def _send(self, kind: str, trial: Any, result: dict[str, Any] | None = None) -> None:
        recorder = _RECORDERS.get(self.sweep_path)
        if recorder is not None:
            recorder.record(TrialNote.of(kind, trial, result))
            return
        if self._relay is None:
            import ray

            try:
                self._relay = ray.get_actor(relay_name(self.sweep_path))
            except ValueError:  # no driver listens: nothing can record the trial
                self._relay = False
        if self._relay:
            # One caller's calls reach an actor in order: the events arrive as they happened.
            self._relay.put.remote(TrialNote.of(kind, trial, result))

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._running.add(trial.trial_id)
        self._send("started", trial)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        self._send("result", trial, result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._running.discard(trial.trial_id)
        self._send("completed", trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._running.discard(trial.trial_id)
        self._send("failed", trial)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Tune ends a sweep whose goal was met, or whose time budget ran out, by marking its
        # running trials terminated, with no on_trial_complete: each ended at its last result.
        # (An interrupted sweep leaves them running, to resume: their runs are closed KILLED.)
        for trial in trials:
            if trial.trial_id in self._running and trial.status == "TERMINATED":
                self._running.discard(trial.trial_id)
                self._send("ended", trial)


def release(sweep_path: str) -> None:
    _RECORDERS.pop(sweep_path, None)
