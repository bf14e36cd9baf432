"""Run records and locks: what ``--resume`` and the next invocation rely on, in-process."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from raylens.cluster.experiment import Experiment
from raylens.cluster.runs import RunLock, RunRecord, Status, abandoned_runs, spec_changes, spec_fingerprint
from raylens.errors import UserError
from raylens.storage import Location
from raylens.trainer.tracking import MlflowTracker
from tests.servers import S3Server


def record(name: str, status: Status = Status.RUNNING) -> RunRecord:
    return RunRecord(f"spec/{name}", "run", "hash", {}, "fingerprint", "v1", status=status)


def test_a_record_round_trips_and_a_live_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    saved = record("a", Status.INTERRUPTED)
    saved.trial_runs["t1"] = "run-1"
    saved.save(tmp_path / "a")
    assert RunRecord.load(tmp_path / "a") == saved
    first = RunLock(tmp_path / "a")
    assert first.try_acquire()
    assert not RunLock(tmp_path / "a").try_acquire()  # flock: another open file is refused
    first.release()
    assert RunLock(tmp_path / "a").try_acquire()


def test_only_running_records_without_a_live_holder_are_abandoned(tmp_path: Path) -> None:
    for name, status in [("dead", Status.RUNNING), ("live", Status.RUNNING), ("done", Status.FINISHED)]:
        record(name, status).save(tmp_path / name)
    holder = RunLock(tmp_path / "live")
    assert holder.try_acquire()
    assert [r.run_name for _, r in abandoned_runs(tmp_path)] == ["spec/dead"]
    holder.release()


def test_the_runs_of_an_abandoned_run_are_closed_as_killed_with_their_children(tmp_path: Path) -> None:
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "spec", tmp_path / "artifacts")
    root = tracker.start_run("root", tags={"raylens.run": "spec/dead"})
    trial = tracker.start_run("trial", parent_run_id=root)
    other = tracker.start_run("other", tags={"raylens.run": "spec/alive"})
    assert tracker.close_runs_tagged("raylens.run", "spec/dead") == 2
    status = {run_id: tracker.client.get_run(run_id).info.status for run_id in (root, trial, other)}
    assert status == {root: "KILLED", trial: "KILLED", other: "RUNNING"}


def test_spec_changes_name_each_key() -> None:
    _, before = spec_fingerprint(
        {"train": {"epochs": 10, "optimizer": {"lr": 0.1}}, "tracking": {"uri": "x"}}
    )
    _, after = spec_fingerprint({"train": {"epochs": 11, "optimizer": {"lr": 0.1}}, "tracking": {"uri": "x"}})
    assert spec_changes(before, after) == ["train.epochs: 10 → 11"]
    _, secret = spec_fingerprint({"tracking": {"uri": "postgresql://me:hunter2@db/x"}})
    assert "hunter2" not in str(secret)


def test_on_object_storage_records_round_trip_and_only_this_hosts_dead_runs_are_abandoned(
    s3_env: S3Server,
) -> None:
    spec_folder = Location.of(s3_env.uri("raylens", "records/spec"))
    here, elsewhere = socket.gethostname(), "another-host"
    for name, host in [("dead", here), ("live", here), ("other-host", elsewhere)]:
        replace(record(name), host=host).save(spec_folder / name)
    assert RunRecord.load(spec_folder / "dead") == replace(record("dead"), host=here)

    # No file locks on object storage: the lock is a file of this machine, named after the run.
    holder = RunLock(spec_folder / "live")
    assert holder.try_acquire() and not RunLock(spec_folder / "live").try_acquire()
    assert not holder.path.is_relative_to(Path.cwd())
    # A run of another host may be alive there: only this host's runs are judged.
    assert [r.run_name for _, r in abandoned_runs(spec_folder)] == ["spec/dead"]
    holder.release()


def test_a_run_folder_on_object_storage_is_tracked_on_a_server_not_in_sqlite(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ndata: {source: 'sklearn:iris', target: target}\n")
    runs = s3_env.uri("raylens", "no-tracking")
    with pytest.raises(UserError, match="object storage, where no SQLite tracking store can live; give an"):
        Experiment.from_yaml(spec, runs).run()
    assert not Location.of(runs).exists()  # refused before anything was written
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert Experiment.from_yaml(spec, runs).tracking_uri == "http://127.0.0.1:5999"


def _spec_tracked_in(folder: Path) -> Path:
    """A spec whose runs are tracked in a SQLite file of ``folder`` (not in the run folder)."""
    spec = folder / "spec.yaml"
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    spec.write_text(
        f"name: x\ndata: {{source: 'sklearn:iris', target: target}}\ntracking: {{uri: '{tracking}'}}\n"
    )
    return spec


def test_on_object_storage_a_run_another_host_is_running_is_not_resumed_here(
    s3_env: S3Server, tmp_path: Path
) -> None:
    spec = _spec_tracked_in(tmp_path)
    runs = Location.of(s3_env.uri("raylens", "elsewhere-runs"))
    (runs / "ray" / "x" / "LATEST").write_text("x/1")
    replace(record("1"), run_name="x/1", host="another-host").save(runs / "ray" / "x" / "1")
    with pytest.raises(UserError, match=r"run x/1 is running on another-host.*Resume it on another-host"):
        Experiment.from_yaml(spec, runs.uri).run(resume=True)
    assert RunRecord.load(runs / "ray" / "x" / "1").host == "another-host"  # nothing rewritten


def test_a_run_folder_in_a_bucket_that_does_not_exist_is_refused_before_anything_is_written(
    s3_env: S3Server, tmp_path: Path
) -> None:
    spec = _spec_tracked_in(tmp_path)
    with pytest.raises(UserError, match=r"there is no bucket 'no-such-bucket'.*create it, or give another"):
        Experiment.from_yaml(spec, s3_env.uri("no-such-bucket", "runs")).run()
    assert not (tmp_path / "mlflow.db").exists()
    assert Experiment.from_yaml(spec, s3_env.uri("raylens", "runs")).validate().ok


def test_a_warm_start_by_experiment_name_takes_its_latest_finished_sweep(tmp_path: Path) -> None:
    from raylens.cluster.invocation import latest_sweep
    from raylens.tuning.leaderboard import LEADERBOARD

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, "digits", tmp_path / "artifacts")

    def root(with_board: bool, status: str = "FINISHED") -> str:
        run = tracker.start_run("root", tags={"raylens.role": "experiment"})
        if with_board:
            tracker.log_dict(run, {"metric": "valid_loss", "rows": []}, LEADERBOARD)
        tracker.end_run(run, status)
        return run

    earlier = root(with_board=True)
    root(with_board=True, status="KILLED")  # an interrupted sweep: not finished
    root(with_board=False)  # a `raylens train`: no leaderboard
    assert latest_sweep(uri, "digits") == earlier
    assert latest_sweep(uri, earlier) == earlier  # a run id is taken as it is
    with pytest.raises(UserError, match=r"neither a run id nor an MLflow experiment .*: Default, digits"):
        latest_sweep(uri, "digit")
    MlflowTracker(uri, "empty", tmp_path / "artifacts")
    with pytest.raises(UserError, match="experiment 'empty' holds no finished sweep"):
        latest_sweep(uri, "empty")
