"""Faults inside a Ray Train run, on a real local Ray cluster: a worker killed mid-epoch, and a
checkpoint that cannot be read back. The uninterrupted run they are compared with runs in the
2-process gloo harness: the Ray Train bridge must train exactly what plain ``run_worker`` trains."""

from __future__ import annotations

import json
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import ray.train
import torch

from raylens.features import FeatureSet
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob
from raylens.trainer.parallel import CorruptCheckpoint, gather_checkpoint, load_checkpoint, save_checkpoint
from raylens.trainer.ray_train import restore_point, train_distributed
from raylens.trainer.run import TrainRunResult, train_and_record
from raylens.trainer.tracking import MlflowTracker
from raylens.trainer.watchdog import BACKWARD, FORWARD, Stall, StallWatch
from tests.trainer.gloo import Ranks, run_ranks

SLOW_MLP = TorchModelConfig(
    name="tests.faults.slow_models:build", params={"hidden": [16], "dropout": 0.2, "step_seconds": 0.05}
)


def job(iris: FeatureSet, epochs: int, *, max_failures: int = 1, keep: int = 2) -> TrainJob:
    return TrainJob.for_feature_set(
        SLOW_MLP,
        TrainConfig(
            epochs=epochs,
            batch_size=8,
            optimizer={"lr": 0.02},
            scaling={"workers": 2, "strategy": "ddp"},
            max_failures=max_failures,
            checkpoints_to_keep=keep,
        ),
        iris,
    )


def train_workers() -> list[int]:
    """Processes running Ray Train workers (Ray titles them ``ray::RayTrainWorker...``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::RayTrainWorker"):
                found.append(int(entry.name))
    return sorted(found)


def tracked_run(iris: FeatureSet, folder: Path, on_epoch, on_notice) -> tuple[TrainRunResult, MlflowTracker]:  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True)
    tracker = MlflowTracker(f"sqlite:///{folder}/mlflow.db", "faults", folder / "artifacts")
    result = train_and_record(
        job(iris, 6, keep=10),
        iris,
        tracker=tracker,
        run_name="final",
        storage_path=folder / "ray",
        params={},
        tags={},
        on_epoch=on_epoch,
        on_notice=on_notice,
    )
    return result, tracker


def registered(run: Path) -> list[Path]:
    """The checkpoints Ray Train has registered for the run, oldest first (a checkpoint written
    but not yet registered when a worker dies is not one a restart reads)."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [run / entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]]


def uninterrupted(ranks: Ranks, job: TrainJob) -> dict[str, Any]:
    run = ranks.train(job)
    return {"metrics": run.metrics, "model": run.states[-1]["model"]}


@pytest.mark.usefixtures("ray_cluster")
def test_a_lost_worker_and_an_unreadable_latest_checkpoint_end_as_if_nothing_happened(
    iris: FeatureSet, tmp_path: Path
) -> None:
    """A worker is SIGKILLed mid-run and the checkpoint the run would restart from is found
    truncated (a node lost during an upload): Ray Train restarts the group from the newest
    readable checkpoint, says so once, logs each epoch once, and ends with the model an
    uninterrupted run of the same job ends with (dropout, 2-rank DDP), bit for bit."""
    reference = run_ranks(
        partial(uninterrupted, job=job(iris, 6)), iris.read("train"), iris.read("valid"), tmp_path / "gloo"
    )[0]
    run = tmp_path / "killed" / "ray" / "final"
    killed: list[int] = []
    earlier: dict[Path, bytes] = {}
    notices: list[str] = []

    def lose_a_worker_and_its_latest_checkpoint(metrics: dict[str, float]) -> None:
        if killed or len(registered(run)) < 2:
            return
        victim = train_workers()[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        # With a worker gone no new checkpoint is made; wait for Ray to register any report under
        # way, then truncate the newest registered checkpoint: the one the restart reads.
        found, since = registered(run), time.monotonic()
        while time.monotonic() - since < 1.0:
            time.sleep(0.05)
            if (now := registered(run)) != found:
                found, since = now, time.monotonic()
        (found[-1] / "checkpoint.pt").write_bytes(b"half an upload")
        earlier.update({folder: (folder / "checkpoint.pt").read_bytes() for folder in found[:-1]})

    result, tracker = tracked_run(
        iris, tmp_path / "killed", lose_a_worker_and_its_latest_checkpoint, notices.append
    )

    assert killed, "no Ray Train worker was found to kill"
    assert len(notices) == 1 and "latest checkpoint is unreadable" in notices[0], notices
    assert earlier and all(
        folder.joinpath("checkpoint.pt").read_bytes() == b for folder, b in earlier.items()
    )
    history = tracker.client.get_metric_history(result.run_id, "valid_loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # the replayed epochs are logged once
    assert [m["valid_loss"] for m in result.history] == [m["valid_loss"] for m in reference["metrics"]]
    final = load_checkpoint(result.checkpoint_dir)["model"]
    for name, tensor in reference["model"].items():
        assert torch.equal(final[name], tensor), name


def test_restore_point_falls_back_to_the_newest_readable_checkpoint(tmp_path: Path) -> None:
    """What a restarted worker resumes from (no workers needed to decide it)."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folders = [tmp_path / "r" / f"checkpoint_2026-11-29_00-00-0{e}.000000" for e in (1, 2, 3)]
    for epoch, folder in enumerate(folders, 1):
        save_checkpoint(gather_checkpoint(model, optimizer, epoch), folder)
    (folders[2] / "checkpoint.pt").write_bytes(b"half an upload")
    (folders[1] / "checkpoint.pt").write_bytes(b"")
    first = (folders[0] / "checkpoint.pt").read_bytes()

    state, notice = restore_point(ray.train.Checkpoint(str(folders[2])))
    assert state["epoch"] == 1
    assert notice is not None and "latest checkpoint is unreadable" in notice and folders[0].name in notice
    assert (folders[0] / "checkpoint.pt").read_bytes() == first  # only read

    state, notice = restore_point(ray.train.Checkpoint(str(folders[0])))
    assert state["epoch"] == 1 and notice is None

    (folders[0] / "checkpoint.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CorruptCheckpoint, match=r"no checkpoint of this run can be read.*without --resume"):
        restore_point(ray.train.Checkpoint(str(folders[2])))


@pytest.mark.usefixtures("ray_cluster")
def test_a_stalled_step_fails_the_attempt_naming_the_rank_and_the_run_goes_on(
    iris: FeatureSet, tmp_path: Path
) -> None:
    """Rank 1 blocks in its forward of step 8 (epoch 2); rank 0 waits for it in backward's
    all-reduce. Both watches fire after train.step_timeout_s; the notice names rank 1, and the
    restarted group (the hang does not recur) finishes from epoch 1's checkpoint."""
    stalling = TrainJob.for_feature_set(
        TorchModelConfig(
            name="tests.faults.slow_models:stalls_once",
            params={"hidden": [16], "marker": str(tmp_path / "stalled"), "at": 8, "rank": 1, "seconds": 600},
        ),
        TrainConfig(
            epochs=3,
            batch_size=8,
            scaling={"workers": 2, "strategy": "ddp"},
            step_timeout_s=3,
            max_failures=1,
        ),
        iris,
    )
    notices: list[str] = []
    started = time.monotonic()
    outcome = train_distributed(
        stalling, iris, run_name="stall", storage_path=tmp_path / "ray", on_notice=notices.append
    )
    assert (tmp_path / "stalled").exists()
    assert time.monotonic() - started < 120  # not the 600 s the step would have blocked
    assert [m["epoch"] for m in outcome.history] == [1.0, 2.0, 3.0]
    stalls = [n for n in notices if "made no progress" in n]
    assert len(stalls) == 1, notices
    (notice,) = stalls
    assert notice.startswith("rank 1 made no progress for 3 s, in forward of step 8 (epoch 2)"), notice
    assert "rank(s) 0 waited on it" in notice and "restarts from its latest checkpoint" in notice


def test_the_watch_times_steps_not_the_set_up_before_the_first() -> None:
    """Reading data, building the model and waiting for the slowest peer to join the process
    group come before the first batch: a slow start is not a stall."""
    heard: list[Stall] = []
    ended: list[bool] = []
    watch = StallWatch(0.2, rank=0, report=heard.append, end=lambda: ended.append(True))
    try:
        time.sleep(1.0)  # five timeouts of set-up
        assert heard == [] and ended == []
        watch.beat(epoch=0, step=0, phase=FORWARD)  # the first batch: from here on, timed
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (heard[0].rank, heard[0].step, heard[0].phase) == (0, 0, FORWARD) and ended
    finally:
        watch.close()


def test_the_least_advanced_rank_is_blamed() -> None:
    def stall(rank: int, step: int, phase: int) -> Stall:
        return Stall(rank, epoch=1, step=step, phase=phase, waited=61.0, timeout=60.0)

    assert Stall.blame([stall(0, 7, BACKWARD), stall(1, 7, FORWARD)]).startswith(
        "rank 1 made no progress for 61 s, in forward of step 8 (epoch 2); rank(s) 0 waited on it"
    )
    # A pipeline's stages all wait inside one schedule step: every one of them is named.
    assert Stall.blame([stall(1, 3, FORWARD), stall(0, 3, FORWARD)]).startswith("ranks 1, 0 made no progress")
