"""The Ray Train bridge: launch N workers that each run the same job, carry reports and checkpoints.

Ray Train only launches processes, sets up the process group and persists checkpoints; the
training itself is ``run_worker``. Rank 0 also puts each epoch's metrics on a queue, so the
driver (the one writer to the tracker) sees them live and can draw progress.

One worker on CPU on embedded Ray (the cluster is this machine, started by this process) needs
none of that, and starting a worker group costs seconds: the driver trains itself
(``trains_in_driver``), writing its checkpoints into the run folder as Ray Train lays them out.
Ray Train's own local mode (``ScalingConfig(num_workers=0)``) is no substitute: in Ray 2.60 it
persists nothing (``get_checkpoint()`` is only the last reported checkpoint of the same call), so
a resume would start over, and it ignores ``FailureConfig``.

Two promises hold whatever restarts happen:
- the driver hears each epoch once: after a worker-group restart the epochs since the restored
  checkpoint are trained and reported again, bit-identical (the checkpoint carries the random
  state), and the replay is not passed on;
- an interrupted driver (Ctrl-C, SIGTERM) aborts its run through the Train controller, so no
  worker keeps training after the invocation ended; the checkpoints stay for a resume.

A run trained in the driver keeps both, and ``max_failures`` for errors its training raises
(it restarts from the latest checkpoint). A process that dies (SIGKILL, the OOM killer) takes the
invocation with it, as the death of any driver does: its complete checkpoints stay, and
``--resume`` goes on from the latest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointUploadMode
from ray.util.queue import Empty, Queue

from raylens.features import FeatureSet
from raylens.features.store import TARGET, WRITE_ROWS
from raylens.interrupts import deferred_interrupts
from raylens.ray_data_reads import first_read_path
from raylens.storage import Location, ray_storage
from raylens.trainer.config import BestCheckpointConfig
from raylens.trainer.decisions import Action
from raylens.trainer.family import TrainingFailed, TrainJob
from raylens.trainer.job import StreamedSplit, raise_if_failed, run_worker
from raylens.trainer.loop import TrainState
from raylens.trainer.parallel import (
    CorruptCheckpoint,
    gather_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_checkpoint,
)
from raylens.trainer.parallel.checkpoint import write_attachments
from raylens.trainer.ray_controller import (
    CHECKPOINT,
    CONTROLLER,
    EPOCH,
    FAILED,
    NOTICE,
    STALLED,
    STOPPED,
    CheckpointRelay,
    ControllerHandle,
)
from raylens.trainer.watchdog import Stall, StallWatch, report_grace

logger = logging.getLogger(__name__)


Kept = TypeVar("Kept")
"""A kept checkpoint: a folder, or a ``ray.train.Checkpoint`` of the storage."""


@dataclass(frozen=True)
class TrainOutcome:
    """Where the final checkpoint lies and the metrics of every epoch, in order."""

    checkpoint_dir: Path
    history: list[dict[str, float]]
    run_path: str
    best: tuple[Path, dict[str, float]] | None = None
    """With ``train.best_checkpoint``: the best checkpoint kept, and its report's metrics."""
    stopped_by: str | None = None
    """Why a debugger rule stopped the run early (its finding), if one did."""


class RayTrainReporter:
    """Reports through ``ray.train.report``; rank 0 feeds the driver. A whole checkpoint is rank
    0's; of a sharded one every rank reports its own files, which Ray merges into one folder."""

    def __init__(self, rank: int, queue: Queue | None) -> None:
        self.rank = rank
        self.queue = queue

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        checkpoint = None
        # Ray uploads the folder in the background and deletes it after: training goes on while
        # the controller collects the report.
        folder = (
            Path(tempfile.mkdtemp(prefix="raylens-checkpoint-")) if state.sharded or self.rank == 0 else None
        )
        # A collective; ``folder`` is untouched where this rank writes nothing.
        wrote = write_checkpoint(state, folder or Path(tempfile.gettempdir()), rank=self.rank)
        if wrote and folder is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        if self.rank == 0 and self.queue is not None:
            self.queue.put_nowait((EPOCH, metrics))


def restore_point(checkpoint: ray.train.Checkpoint) -> tuple[dict[str, Any], str | None]:
    """The state to resume from: ``checkpoint`` (the latest Ray persisted), or when it cannot be
    read the newest older checkpoint of the same run that can. Returns the state and a notice
    when it fell back. Older checkpoints are only read, never changed."""
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    assert fs is not None  # a persisted checkpoint always knows its filesystem
    parent, name = posixpath.split(path)
    siblings = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted(
        (i.path for i in siblings if i.type == pyarrow.fs.FileType.Directory and i.base_name < name),
        key=posixpath.basename,
        reverse=True,
    )
    problems = []
    for candidate in [path, *(p for p in older if posixpath.basename(p).startswith("checkpoint_"))]:
        try:
            with ray.train.Checkpoint(candidate, filesystem=fs).as_directory() as folder:
                state = load_checkpoint(Path(folder))
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
            continue
        notice = None
        if candidate != path:
            notice = (
                f"the latest checkpoint is unreadable ({problems[0]}); resuming from "
                f"{posixpath.basename(candidate)} (epoch {state['epoch']}) instead"
            )
        return state, notice
    raise CorruptCheckpoint(
        "no checkpoint of this run can be read: "
        + "; ".join(problems)
        + ". Start the run anew without --resume"
    )


SHUFFLE_BUFFER_BATCHES = 8
"""A streamed epoch is shuffled within chunks of this many batches' rows, each epoch anew."""


def streamed_dataset(feature_set: FeatureSet, split: str = "train") -> ray.data.Dataset:
    """A stored split as a Ray Data dataset of two columns: ``x``, the feature columns as one
    fixed-size float32 tensor per row (packed in Ray Data's tasks, block by block, so the
    training loop gets a ready (batch, features) tensor), and ``y``, the target."""
    import ray.data

    file = feature_set.path / f"{split}.parquet"
    columns = feature_set.feature_columns
    blocks = max(2, feature_set.manifest.rows[split] // WRITE_ROWS)
    # No Ray Data progress bars (the read's sampling, then each epoch's from the stream's
    # coordinator): the run shows its own progress.
    with first_read_path(progress_bars=False):
        dataset = ray.data.read_parquet(
            file.path, filesystem=file.filesystem, columns=[*columns, TARGET], override_num_blocks=blocks
        )
    return dataset.map_batches(partial(_packed, columns=columns), batch_format="pyarrow")


def _packed(batch: pa.Table, columns: list[str]) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    x = np.stack([batch.column(c).to_numpy() for c in columns], axis=1).astype(np.float32, copy=False)
    return pa.table({"x": ArrowTensorArray.from_numpy(x), "y": batch.column(TARGET)})


class RayDataBatches:
    """This worker's shard of a streamed split (``ray.train.get_dataset_shard``), an epoch at a
    time: batches of ``(x, y)`` tensors on ``device``. Ray Train deals every worker as many
    rows (``streaming_split(equal=True)``), so every worker trains as many batches."""

    def __init__(self, shard: Any, rows: int, device: torch.device, seed: int, target: torch.dtype) -> None:
        self.shard, self.rows, self.device, self.seed, self.target = shard, rows, device, seed, target

    def __len__(self) -> int:
        return self.rows

    def epoch(self, epoch: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rows in ``SHUFFLE_BUFFER_BATCHES`` batches at a time, shuffled within them: one gather
        per chunk and batches that are views of it (Ray Data's own local shuffle buffer and torch
        batches copy row by row and batch by batch: half the rows per second)."""
        shuffle = np.random.default_rng(self.seed * 100_003 + epoch)
        for chunk in self.shard.iter_batches(
            batch_size=SHUFFLE_BUFFER_BATCHES * batch_size, batch_format="numpy"
        ):
            order = shuffle.permutation(len(chunk["y"]))
            x = torch.from_numpy(chunk["x"][order]).to(self.device)
            y = torch.from_numpy(chunk["y"][order]).to(self.device, self.target)
            for start in range(0, len(y), batch_size):
                yield x[start : start + batch_size], y[start : start + batch_size]


STREAM_CPUS = 1.0
"""Logical CPUs Ray Data reads and packs a streamed split with, beside the training workers: a
read keeps ahead of a CPU worker's steps with one, and each more starts more worker processes."""


def _streamed(job: TrainJob, feature_set: FeatureSet) -> dict[str, Any]:
    """The TorchTrainer's datasets where the job streams its training split, else nothing."""
    if job.train.data != "ray_data":
        return {}
    from ray.data import ExecutionOptions, ExecutionResources

    options = ExecutionOptions(resource_limits=ExecutionResources(cpu=STREAM_CPUS))
    return {
        "datasets": {"train": streamed_dataset(feature_set)},
        "dataset_config": ray.train.DataConfig(datasets_to_split=["train"], execution_options=options),
    }


def _streamed_split(
    job: TrainJob, feature_set: FeatureSet, rank: int, world_size: int, device: torch.device
) -> StreamedSplit:
    """The training split as this worker streams it, with its first rows and its targets."""
    rows = feature_set.manifest.rows["train"] // world_size  # an equal split drops the rest
    target = torch.int64 if job.task.kind == "classification" else torch.float32  # as stored
    batches = RayDataBatches(
        ray.train.get_dataset_shard("train"), rows, device, job.train.seed + rank, target
    )
    return StreamedSplit(
        batches, feature_set.read_head("train", job.train.batch_size), feature_set.read_targets("train")
    )


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    job: TrainJob = config["job"]
    queue: Queue | None = config.get("queue")
    torch.set_num_threads(worker_threads(job))
    feature_set = FeatureSet(Location.of(config["feature_set_path"]), config["manifest"])
    resume_from = None
    # The run's own latest checkpoint (a restart, a resume) before the one it was started from.
    checkpoint = ray.train.get_checkpoint() or config.get("start_from")
    if checkpoint is not None:
        resume_from, notice = restore_point(checkpoint)
        if notice and rank == 0 and queue is not None:
            queue.put_nowait((NOTICE, notice))
    watch = None
    if job.train.step_timeout_s is not None:
        watch = StallWatch(job.train.step_timeout_s, rank, partial(_report_stall, queue))
    try:
        streams = job.train.data == "ray_data"
        device = ray.train.torch.get_device()
        result = run_worker(
            job,
            _streamed_split(job, feature_set, rank, world_size, device)
            if streams
            else feature_set.read("train"),
            feature_set.read("valid"),
            RayTrainReporter(rank, queue),
            rank=rank,
            world_size=world_size,
            device=device,
            resume_from=resume_from,
            heartbeat=watch,
            on_finding=None if queue is None else lambda finding: queue.put_nowait((NOTICE, finding.said())),
        )
    finally:
        if watch is not None:
            watch.close()
    # A failed run (a diverged loss) would fail again from any checkpoint: rather than raise
    # (Ray would restart the worker group max_failures times), the workers end and rank 0 tells
    # the driver why, which fails the run.
    if result.stopped is not None and result.stopped.action is Action.FAIL:
        if queue is None:
            raise_if_failed(result)
        elif rank == 0:
            queue.put_nowait((FAILED, result.stopped.reason))
    elif result.stopped is not None and result.stopped.rule is not None and rank == 0 and queue is not None:
        queue.put_nowait((STOPPED, result.stopped.reason))


def _report_stall(queue: Queue | None, stall: Stall) -> None:
    if queue is not None:
        queue.put((STALLED, stall), timeout=5)


class _StallReports:
    """The stall reports of one failed attempt, told as one notice once every stalled rank's
    watch has had time to report (they fire within a few seconds of each other)."""

    def __init__(self, on_notice: Callable[[str], None]) -> None:
        self.on_notice = on_notice
        self.pending: list[Stall] = []
        self.since = 0.0
        self.told: list[str] = []

    def add(self, stall: Stall) -> None:
        if not self.pending:
            self.since = time.monotonic()
        self.pending.append(stall)

    def flush(self, *, force: bool = False) -> None:
        grace = report_grace(self.pending[0].timeout) if self.pending else 0
        if self.pending and (force or time.monotonic() - self.since > grace):
            self.told.append(Stall.blame(self.pending))
            self.on_notice(self.told[-1])
            self.pending = []


def worker_threads(job: TrainJob) -> int:
    """Torch threads of one worker: its CPUs."""
    return max(1, round(job.train.scaling.cpus_per_worker))


def scaling_config(job: TrainJob) -> ray.train.ScalingConfig:
    """The spec's ``train.scaling`` as Ray Train takes it."""
    scaling = job.train.scaling
    return ray.train.ScalingConfig(
        # Ray Train V2 takes (min, max) for an elastic run; its type hints are V1's.
        num_workers=scaling.workers,  # type: ignore[arg-type]
        use_gpu=scaling.use_gpu,
        resources_per_worker={"CPU": scaling.cpus_per_worker},
    )


def train_distributed(
    job: TrainJob,
    feature_set: FeatureSet,
    *,
    run_name: str,
    storage_path: Path | str | Location,
    on_epoch: Callable[[dict[str, float]], None] = lambda metrics: None,
    on_notice: Callable[[str], None] = logger.warning,
    embedded: bool = False,
    on_checkpoint: Callable[[dict[str, float], ray.train.Checkpoint], None] | None = None,
    start_from: ray.train.Checkpoint | None = None,
) -> TrainOutcome:
    """Train with ``job.train.scaling.workers`` Ray Train workers; resume if ``run_name`` has a
    checkpoint under ``storage_path`` already, else start from ``start_from`` when given (a
    checkpoint of another run). ``on_epoch`` hears each epoch once, in order; ``on_checkpoint``
    each epoch's checkpoint once persisted, with that epoch's metrics, once, in order.

    ``embedded``: the Ray cluster is this machine alone, started by this process; then a
    1-worker CPU job trains in this process instead (``trains_in_driver``), when the storage is
    a local folder: Ray Train's workers write to object storage, the driver does not.

    The outcome's checkpoints are local folders: on object storage, copies of the ones kept there."""
    storage_path = Location.of(storage_path)
    if trains_in_driver(job, embedded=embedded) and storage_path.local:
        return _train_in_driver(job, feature_set, storage_path.local_path / run_name, on_epoch, on_notice)
    queue = Queue(actor_options=beside_the_driver())
    # Ray Train takes controller callbacks beside its own kinds (its type hints name these only).
    callbacks: list[Any] = [ControllerHandle(queue)]
    if on_checkpoint is not None:
        callbacks.append(CheckpointRelay(queue))
    trainer = ray.train.torch.TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "job": job,
            "feature_set_path": feature_set.path.uri,
            "manifest": feature_set.manifest,
            "queue": queue,
            "start_from": start_from,
        },
        scaling_config=scaling_config(job),
        **_streamed(job, feature_set),
        run_config=ray.train.RunConfig(
            name=run_name,
            **ray_storage(storage_path),
            checkpoint_config=_checkpoint_config(job),
            failure_config=ray.train.FailureConfig(max_failures=job.train.max_failures),
            callbacks=callbacks,
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome["error"] = exc

    # fit() blocks, so it runs beside the loop that drains live metrics for the caller.
    thread = threading.Thread(target=fit, name="raylens-fit", daemon=True)
    thread.start()
    history: dict[float, dict[str, float]] = {}
    controller: list[Any] = []
    failed: list[str] = []
    stopped: list[str] = []
    stalls = _StallReports(on_notice)
    relayed: set[float] = set()

    def relay(metrics: dict[str, float], checkpoint: ray.train.Checkpoint) -> None:
        epoch = metrics.get("epoch")
        if on_checkpoint is not None and epoch is not None and epoch not in relayed:  # else a replay
            relayed.add(epoch)
            on_checkpoint(metrics, checkpoint)

    def drain(block: bool) -> None:
        while True:
            try:
                kind, payload = queue.get(block=block, timeout=0.5) if block else queue.get_nowait()
            except Empty:
                return
            if kind == CONTROLLER:
                controller.append(payload)
            elif kind == NOTICE:
                on_notice(payload)
            elif kind == FAILED:
                failed.append(payload)
            elif kind == STOPPED:
                stopped.append(payload)
            elif kind == STALLED:
                stalls.add(payload)
            elif kind == CHECKPOINT:
                relay(*payload)
            elif payload["epoch"] not in history:  # a replay after a restart: heard already
                history[payload["epoch"]] = payload
                on_epoch(payload)

    try:
        while thread.is_alive():
            drain(block=True)
            stalls.flush()
        drain(block=False)
        stalls.flush(force=True)
    except BaseException:
        _abort(controller, thread)
        raise
    finally:
        queue.shutdown()
    if "error" in outcome:
        if stalls.told:  # the restarts ran out: the stall is why, not a worker that "died"
            raise TrainingFailed(
                f"{stalls.told[-1].split(': a hung')[0]}, and max_failures ({job.train.max_failures}) "
                "restarts did not get past it; raise train.step_timeout_s if such steps are expected"
            ) from outcome["error"]
        raise outcome["error"]
    if failed:
        raise TrainingFailed(failed[0])
    result = outcome["result"]
    if result.checkpoint is None:
        raise RuntimeError(f"training run '{run_name}' finished without a checkpoint")
    # The controller's last message can still be on its way when ``fit`` returns: the result
    # holds the same checkpoint and metrics.
    relay(dict(result.metrics), result.checkpoint)
    best = _best(job, [(c, dict(m)) for c, m in (result.best_checkpoints or [])])
    return TrainOutcome(
        _local(result.checkpoint),
        [history[e] for e in sorted(history)],
        str(result.path),
        None if best is None else (_local(best[0]), best[1]),
        stopped[-1] if stopped else None,
    )


def _local(checkpoint: ray.train.Checkpoint) -> Path:
    """A persisted checkpoint as a local folder: itself on a local file system, else a copy."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="raylens-checkpoint-")))


def _checkpoint_config(job: TrainJob) -> ray.train.CheckpointConfig:
    best = job.train.best_checkpoint
    if best is None:
        return ray.train.CheckpointConfig(num_to_keep=job.train.checkpoints_to_keep)
    return ray.train.CheckpointConfig(
        num_to_keep=job.train.checkpoints_to_keep,
        checkpoint_score_attribute=best.metric,
        checkpoint_score_order=best.mode,
    )


def _best(job: TrainJob, kept: list[tuple[Kept, dict[str, float]]]) -> tuple[Kept, dict[str, float]] | None:
    """The best of the ``kept`` checkpoints by ``train.best_checkpoint`` (the earliest of ties)."""
    best = job.train.best_checkpoint
    scored = [(path, metrics) for path, metrics in kept if best is not None and best.metric in metrics]
    if best is None or not scored:
        return None
    sign = 1.0 if best.mode == "min" else -1.0
    return min(scored, key=lambda item: (sign * item[1][best.metric], item[1].get("epoch", 0.0)))


def beside_the_driver() -> dict[str, Any]:
    """Actor options that keep the run's queue on the driver's node: anywhere else the loss of
    that node (one the run survives, restarting its workers) would take the queue, and the run
    with it. Not soft: Ray places a soft-affine actor elsewhere at times, with room to spare."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


def _abort(controller: list[Any], fit_thread: threading.Thread) -> None:
    """Stop the run's workers and wait for ``fit`` to return, so nothing trains on after the
    driver gave up and Ray can be shut down cleanly."""
    if controller:
        # The controller exits as part of aborting: its death is the success.
        with contextlib.suppress(Exception):
            ray.get(controller[0].abort.remote(), timeout=30)
    fit_thread.join(timeout=30)


def trains_in_driver(job: TrainJob, *, embedded: bool) -> bool:
    """Whether the driver trains the job itself: one CPU worker, on a cluster that is this
    machine alone. On any other cluster Ray places the worker (a Ray Client driver is not even
    on the cluster), and GPUs are Ray's to assign."""
    scaling = job.train.scaling
    # A streamed split is dealt by Ray Train to its workers: it needs one.
    return embedded and scaling.workers == 1 and not scaling.use_gpu and job.train.data == "memory"


def checkpoint_folders(run_folder: Path) -> list[Path]:
    """A run's checkpoint folders, oldest first (``checkpoint_<local time>``, Ray Train's names)."""
    if not run_folder.is_dir():
        return []
    return sorted(p for p in run_folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


REPORT_FILE = "report.json"
"""Beside a checkpoint the driver commits: the metrics reported with it (for best-by-metric)."""


def commit_checkpoint(
    state: dict[str, Any],
    run_folder: Path,
    keep: int,
    metrics: dict[str, float] | None = None,
    best: BestCheckpointConfig | None = None,
    *,
    attachments: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``state`` as the run's newest checkpoint and remove all but the ``keep`` newest (with
    ``best``: all but the ``keep`` best by its metric, and the newest). It is written in a
    staging folder and renamed into place, so a ``checkpoint_...`` folder is always whole,
    whatever stops the process."""
    run_folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=run_folder))
    try:
        save_checkpoint(state, staging)
        write_attachments(attachments or {}, staging)
        (staging / REPORT_FILE).write_text(json.dumps(metrics or {}))
        folder = run_folder / f"checkpoint_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in _beyond_keeping(checkpoint_folders(run_folder), keep, best):
        shutil.rmtree(old, ignore_errors=True)
    return folder


def reported_with(folder: Path) -> dict[str, float]:
    """The metrics a committed checkpoint was reported with (empty when not recorded)."""
    try:
        return dict(json.loads((folder / REPORT_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def _beyond_keeping(folders: list[Path], keep: int, best: BestCheckpointConfig | None) -> list[Path]:
    """Which of a run's checkpoints (oldest first) go: all but the newest ``keep``, or with
    ``best`` all but the ``keep`` best and the newest (as Ray Train keeps them)."""
    if best is None:
        return folders[:-keep]
    sign = 1.0 if best.mode == "min" else -1.0
    scored = sorted(folders[:-1], key=lambda f: sign * reported_with(f).get(best.metric, math.inf * sign))
    return [f for f in folders[:-1] if f not in scored[:keep]]


class DriverReporter:
    """Reports of a run the driver trains: each epoch's checkpoint committed to the run folder,
    then the epoch passed to ``on_epoch``. A stop signal waits for both, so a resume never
    starts after an epoch the driver did not hear."""

    def __init__(
        self,
        run_folder: Path,
        keep: int,
        on_epoch: Callable[[dict[str, float]], None],
        best: BestCheckpointConfig | None = None,
    ) -> None:
        self.run_folder = run_folder
        self.keep, self.best = keep, best
        self.on_epoch = on_epoch
        self.listener_error: BaseException | None = None
        """What ``on_epoch`` raised: the caller's error, not a training failure to restart from."""

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        full_state = gather_checkpoint(
            state.model, state.optimizer, state.epoch, step=state.step, so_far=state.so_far
        )
        with deferred_interrupts():
            commit_checkpoint(
                full_state, self.run_folder, self.keep, metrics, self.best, attachments=state.attachments
            )
            try:
                self.on_epoch(dict(metrics))
            except BaseException as exc:
                self.listener_error = exc
                raise


@contextlib.contextmanager
def _as_a_worker(job: TrainJob) -> Iterator[None]:
    """The driver trains with a worker's thread count, and gets its own thread count and random
    state back after (training reseeds the process's generators)."""
    threads, random_state = torch.get_num_threads(), rng_state()
    torch.set_num_threads(worker_threads(job))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        set_rng_state(random_state)


def _train_in_driver(
    job: TrainJob,
    feature_set: FeatureSet,
    run_folder: Path,
    on_epoch: Callable[[dict[str, float]], None],
    on_notice: Callable[[str], None],
) -> TrainOutcome:
    """One worker, in this process: resume from the run folder's latest readable checkpoint,
    and after an error in training restart from it, up to ``max_failures`` times (Ray Train's
    rule for a worker group)."""
    history: dict[float, dict[str, float]] = {}

    def hear(metrics: dict[str, float]) -> None:
        # Heard already: an epoch trained again after falling back to an older checkpoint.
        if metrics["epoch"] not in history:
            history[metrics["epoch"]] = metrics
            on_epoch(metrics)

    reporter = DriverReporter(run_folder, job.train.checkpoints_to_keep, hear, job.train.best_checkpoint)
    train, valid = feature_set.read("train"), feature_set.read("valid")
    failures = 0
    stopped_by = None
    with _as_a_worker(job):
        while True:
            resume_from = None
            if found := checkpoint_folders(run_folder):
                resume_from, notice = restore_point(ray.train.Checkpoint(str(found[-1])))
                if notice:
                    on_notice(notice)
            try:
                ended = raise_if_failed(
                    run_worker(
                        job,
                        train,
                        valid,
                        reporter,
                        resume_from=resume_from,
                        on_finding=lambda finding: on_notice(finding.said()),
                    )
                )
                if ended.stopped is not None and ended.stopped.rule is not None:
                    stopped_by = ended.stopped.reason
                break
            except TrainingFailed:
                raise  # it would fail again from any checkpoint: not retried
            except Exception as exc:
                failures += 1
                if exc is reporter.listener_error or failures > job.train.max_failures:
                    raise
                on_notice(
                    f"training failed ({type(exc).__name__}: {exc}); restarting from the latest "
                    f"checkpoint (failure {failures} of max_failures {job.train.max_failures})"
                )
    found = checkpoint_folders(run_folder)
    if not found:
        raise RuntimeError(f"training run '{run_folder.name}' finished without a checkpoint")
    best = _best(job, [(f, reported_with(f)) for f in found])
    return TrainOutcome(found[-1], [history[e] for e in sorted(history)], str(run_folder), best, stopped_by)
