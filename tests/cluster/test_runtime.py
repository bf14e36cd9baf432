"""What raylens asks of Ray: the settings value handed to ray.init (no Ray started here)."""

import logging
import os
from pathlib import Path

import pytest

from raylens.cluster.runtime import (
    EXPERIMENT_STATE_LOGGER,
    SUBMITTED_JOB_VARIABLE,
    TUNE_CONTROLLER_LOGGER,
    TUNE_LOGGER,
    NotAStagingRace,
    NoTrialTraceback,
    RuntimeSettings,
    check_remote_settings,
    embedded_cpus,
    needs_ray,
    remote_host,
)
from raylens.cluster.workspace import Workspace
from raylens.errors import UserError


def test_workers_get_the_fast_report_poll_and_nothing_else_is_tuned() -> None:
    env = RuntimeSettings.build().worker_env
    # Ray Train's default 2 s poll adds up to 2 s to every epoch (BENCHMARKS.md).
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
    assert "OMP_WAIT_POLICY" not in env  # measured no better (BENCHMARKS.md, thread)


def test_embedded_ray_gets_more_logical_cpus_than_the_machine_has_cores() -> None:
    assert embedded_cpus() > (os.cpu_count() or 1)
    assert embedded_cpus() >= 4


def test_a_submitted_jobs_driver_leaves_the_runtime_environment_to_its_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SUBMITTED_JOB_VARIABLE, raising=False)
    assert not RuntimeSettings.build().submitted
    monkeypatch.setenv(SUBMITTED_JOB_VARIABLE, "{}")  # what Ray's job supervisor sets
    assert RuntimeSettings.build().submitted


def test_a_cluster_off_this_machine_needs_a_shared_run_folder() -> None:
    assert remote_host("10.0.0.5:6379") == "10.0.0.5" and remote_host("ray://head:10001") == "head"
    assert remote_host(None) is remote_host("auto") is remote_host("127.0.0.1:6379") is None

    for local in (None, "auto", "127.0.0.1:6379", "ray://localhost:10001"):
        check_remote_settings(local, runs_dir_given=False)
    for remote in ("10.0.0.5:6379", "ray://10.0.0.5:10001"):
        with pytest.raises(UserError, match=r"here \./raylens-runs on this machine.*--runs-dir"):
            check_remote_settings(remote, runs_dir_given=False)
        check_remote_settings(remote, runs_dir_given=True)


def test_the_default_run_folder_is_known_as_the_default() -> None:
    assert not Workspace.at(None).given and Workspace.at(Path("runs")).given


def test_the_cli_keeps_tunes_trial_tracebacks_for_verbose() -> None:
    """A failed trial's line in the live view says why; Tune's traceback is for --verbose (and
    the trial's MLflow run), a stopped trial's traceback too: it is no failure."""
    from raylens.trainer.family import StoppedByRule

    def record(logger: str, message: str, error: BaseException | None = None) -> logging.LogRecord:
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord(logger, logging.ERROR, __file__, 1, message, (), exc_info)

    quiet = NoTrialTraceback()
    for error in (StoppedByRule("debug rule overfit at step 3 (epoch 1): …"), ValueError("a real failure")):
        assert not quiet.filter(record(TUNE_CONTROLLER_LOGGER, "Trial task failed for trial t", error))
    assert not quiet.filter(record(TUNE_LOGGER, "Trials did not complete: [run_trial_1]"))
    assert quiet.filter(record(TUNE_CONTROLLER_LOGGER, "Trial t: something else went wrong"))


def test_only_the_race_on_rays_half_written_state_file_is_kept_from_the_cli_output() -> None:
    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            EXPERIMENT_STATE_LOGGER,
            logging.ERROR,
            __file__,
            1,
            "Saving experiment state to storage at 'x' failed with exception: ",
            (),
            (type(error), error, None),
        )

    race = FileNotFoundError(
        2,
        "Failed to open local file '/tmp/ray/session_1/artifacts/t/sweep/driver_artifacts/"
        ".367169a8-tmp-basic-variant-state-2026-11-30_19-14-32.json'",
    )
    quiet = NotAStagingRace()
    assert not quiet.filter(record(race))
    assert quiet.filter(record(FileNotFoundError(2, "No such file: 'experiment_state.json'")))
    assert quiet.filter(record(PermissionError(13, "Permission denied: '/runs'")))


def test_only_a_one_worker_train_in_memory_on_local_storage_goes_without_ray() -> None:
    """A run that goes without Ray trains in this process; a streamed split needs Ray Train's
    workers (without an embedded cluster started for it, Ray Data started one of its own, of the
    cores alone, where the one worker's CPUs left Ray Data none: the run hung)."""
    from raylens.trainer import TrainConfig

    def needs(
        command: str = "train", address: str | None = None, local: bool = True, **train: object
    ) -> bool:
        return needs_ray(
            command, TrainConfig.model_validate(train), address=address, one_worker=True, local_storage=local
        )

    assert not needs()
    assert needs(data="ray_data")
    assert needs("run") and needs("tune")
    assert needs(address="ray://head:10001")
    assert needs(local=False)
    assert needs(scaling={"use_gpu": True})
    assert needs_ray("train", TrainConfig(), address=None, one_worker=False, local_storage=True)
