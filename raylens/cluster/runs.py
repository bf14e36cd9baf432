"""What a run folder remembers about its invocation, so ``--resume`` knows what it resumes.

Terms: a *run* is one invocation of ``raylens run|train|tune`` on a spec, with its own folder
``<runs dir>/ray/<spec name>/<timestamp>/``. Its ``run.json`` (a ``RunRecord``) says what it was
started with (the spec, the data's fingerprint, the feature-set version), how far it got, and
the ids of its MLflow runs; ``.lock`` is held by the live process working on it.

A resume refuses, naming what changed, when the spec or the data are not what the run started
with, and when another live process holds the run.

The run folder may be on object storage (``raylens.storage``), which has no file locks: there the
lock is a file on the local machine, named after the run, and a run is judged abandoned only by
the host that ran it (a process id means nothing on another host, whose run may be alive).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from raylens.errors import UserError
from raylens.storage import Location
from raylens.trainer.tracking import flatten, redact

RECORD = "run.json"
LOCK = ".lock"
LATEST = "LATEST"


class Status(StrEnum):
    RUNNING = "running"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    FINISHED = "finished"


@dataclass
class RunRecord:
    """A run's memory. Saved (atomically) after every step that a resume must not redo."""

    run_name: str
    command: str
    """run, train or tune: a resume continues the same command."""
    spec_hash: str
    spec: dict[str, Any]
    """The spec as flat ``key.path: value`` pairs, credentials redacted (for naming changes)."""
    source_fingerprint: str
    feature_set_version: str
    status: Status = Status.RUNNING
    stage: str = "started"
    """started → tuned → trained: the last stage that finished."""
    root_run_id: str | None = None
    trial_runs: dict[str, str] = field(default_factory=dict)
    """Tune trial id → MLflow run id."""
    final_run_id: str | None = None
    best_config: dict[str, Any] | None = None
    best_metrics: dict[str, float] | None = None
    host: str = ""
    """The host of the process that last worked on the run."""

    def save(self, folder: Path | Location) -> None:
        folder = Location.of(folder)
        text = json.dumps(asdict(self), indent=2, sort_keys=True)
        if not folder.local:
            (folder / RECORD).write_text(text)  # an object is written whole or not at all
            return
        local = folder.local_path
        local.mkdir(parents=True, exist_ok=True)
        staged = local / f".{RECORD}.{os.getpid()}"
        staged.write_text(text)
        os.replace(staged, local / RECORD)  # a crash leaves the old record or the new, never half

    @classmethod
    def load(cls, folder: Path | Location) -> RunRecord:
        folder = Location.of(folder)
        path = folder / RECORD
        try:
            data = json.loads(path.read_text())
            data["status"] = Status(data["status"])
            return cls(**data)
        except FileNotFoundError:
            raise UserError(
                f"run folder {folder} has no {RECORD}: it was not started by this version of raylens "
                "or was cut short before it started; start a new run without --resume"
            ) from None
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{path} is damaged ({exc}); start a new run without --resume") from None


def spec_fingerprint(spec_dump: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The hash of the whole spec, and its flat redacted form for naming what changed."""
    text = json.dumps(spec_dump, sort_keys=True, default=str)
    flat = {
        key: redact(value) if isinstance(value, str) else value for key, value in flatten(spec_dump).items()
    }
    return hashlib.sha256(text.encode()).hexdigest(), flat


def spec_changes(before: Mapping[str, Any], after: Mapping[str, Any], limit: int = 6) -> list[str]:
    """``key: old → new`` for every key whose value differs (or that appeared or went away)."""
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, "(unset)"), after.get(key, "(unset)")
        if old != new:
            changed.append(f"{key}: {json.dumps(old, default=str)} → {json.dumps(new, default=str)}")
    shown = changed[:limit]
    if len(changed) > limit:
        shown.append(f"... and {len(changed) - limit} more")
    return shown


class RunLock:
    """An exclusive lock on a run folder, held while a process works on the run.

    ``flock`` is released by the kernel when the holder dies (even by SIGKILL or the OOM
    killer), so a stale lock never blocks a resume; a live holder always does.
    """

    def __init__(self, folder: Path | Location) -> None:
        folder = Location.of(folder)
        if folder.local:
            self.path = folder.local_path / LOCK
        else:
            # Named after the whole URI: its options (an endpoint) tell stores with the same bucket
            # apart, and hold no credentials (refused in storage URIs). One folder per user, in
            # /tmp as every process of the user sees it.
            key = hashlib.sha256(folder.uri.encode()).hexdigest()[:24]
            self.path = Path("/tmp") / f"raylens-locks-{os.getuid()}" / f"{key}{LOCK}"
        self.handle: IO[str] | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()} {os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return True

    def acquire(self, run_name: str) -> RunLock:
        if not self.try_acquire():
            holder = self.path.read_text().strip() or "unknown"
            raise UserError(
                f"run {run_name} is in use by another raylens process (host and pid: {holder}); "
                "wait for it to end, or stop it (Ctrl-C) and resume again"
            )
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def abandoned_runs(spec_folder: Path | Location) -> Iterator[tuple[Location, RunRecord]]:
    """Runs of a spec whose record says RUNNING but whose process is gone (killed by SIGKILL,
    the OOM killer, a lost machine): their MLflow runs are still RUNNING and must be closed."""
    for folder in Location.of(spec_folder).folders():
        if not (folder / RECORD).is_file():
            continue
        try:
            record = RunRecord.load(folder)
        except UserError:
            continue
        if record.status is not Status.RUNNING:
            continue
        if not folder.local and record.host != socket.gethostname():
            continue  # its lock is on another host's disk
        lock = RunLock(folder)
        if lock.try_acquire():
            lock.release()
            yield folder, record
