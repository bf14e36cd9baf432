"""`raylens submit` to a real Ray cluster (`ray start --head` on 127.0.0.1, token auth on) that
records to a real `mlflow server` on 127.0.0.1, its run folder on object storage (moto's S3 API on
127.0.0.1, the credentials in the cluster's environment only); the Jobs API refuses calls without
the token."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from sklearn.datasets import load_iris

from raylens.storage import Location
from tests.cli import RAYLENS
from tests.servers import RayHead, S3Server, clean_environment, mlflow_server, ray_head

pytestmark = pytest.mark.e2e

SPEC = """
name: submitted
data: {source: iris.csv, target: target, split: {valid: 0.2, test: 0.2, seed: 3}}
features: {transforms: [{standardize: "*"}]}
model: {name: mlp, params: {hidden: [16]}}
train: {epochs: 2, batch_size: 16}
tracking: {register_as: submitted-iris}
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> Iterator[RayHead]:
    with ray_head(tmp_path_factory.mktemp("ray-head"), env=s3.env) as running:
        yield running


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


def _project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    load_iris(as_frame=True).frame.to_csv(folder / "iris.csv", index=False)
    (folder / "spec.yaml").write_text(SPEC)
    return folder / "spec.yaml"


def _raylens(*args: str, token: str | None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = clean_environment()
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([RAYLENS, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_a_submitted_spec_trains_on_the_cluster_and_registers_its_model(
    head: RayHead, tracking: str, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submitted, its log streamed here; Ctrl-C detaches while the job goes on; `jobs logs
    --follow` reattaches and ends with the job."""
    spec = _project(tmp_path / "project")
    runs_dir = s3.uri("raylens", "team/raylens-runs")
    env = {**clean_environment(), "RAY_AUTH_TOKEN": head.token}
    submitting = subprocess.Popen(
        [
            RAYLENS,
            "submit",
            str(spec),
            "--address",
            head.dashboard,
            "--runs-dir",
            runs_dir,
            "--tracking-uri",
            tracking,
            "--python",
            sys.executable,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert submitting.stdout is not None
    submitted = submitting.stdout.readline()
    assert submitted.startswith("submitted job "), submitted
    job_id = submitted.split()[2]
    assert submitting.stdout.readline()  # the job's own log has started to stream
    submitting.send_signal(signal.SIGINT)
    rest, detached = submitting.communicate(timeout=60)
    assert submitting.returncode == 0, rest + detached
    assert "detached" in detached and f"raylens jobs logs {job_id} --follow" in detached, detached

    followed = _raylens("jobs", "logs", job_id, "--follow", "--address", head.dashboard, token=head.token)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    assert f"job {job_id} succeeded" in followed.stdout
    assert "test_accuracy" in followed.stdout  # the cluster's run summary

    client = mlflow.MlflowClient(tracking)
    (version,) = client.search_model_versions("name='submitted-iris'")
    run = client.get_run(version.run_id)
    assert 0 <= float(run.data.metrics["test_accuracy"]) <= 1
    epochs = [m.step for m in client.get_metric_history(version.run_id, "train_loss")]
    assert len(epochs) == 2, epochs  # both epochs trained on the cluster and were recorded
    # The tracking server's address went in the job's environment, not into what was logged.
    assert not [k for k, v in run.data.params.items() if tracking.split("//")[1] in v]
    # Features, checkpoints and the run's record went to the object storage given, and were read
    # back from it (the final training's workers, the evaluation of its checkpoint).
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    runs = Location.of(runs_dir)
    (feature_set,) = (runs / "features" / "submitted").folders()
    assert (feature_set / "manifest.json").is_file() and (feature_set / "train.parquet").is_file()
    (run,) = (runs / "ray" / "submitted").folders()
    assert '"status": "finished"' in (run / "run.json").read_text()
    assert [c.name for c in (run / "final").folders() if c.name.startswith("checkpoint_")]
    assert not (tmp_path / "project" / "raylens-runs").exists()

    logs = _raylens("jobs", "logs", job_id, "--address", head.dashboard, token=head.token)
    assert logs.returncode == 0 and "test_accuracy" in logs.stdout
    status = _raylens("jobs", "status", job_id, "--address", head.dashboard, token=head.token)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    listed = _raylens("jobs", "list", "--address", head.dashboard, token=head.token)
    assert listed.returncode == 0 and job_id in listed.stdout


def test_the_jobs_api_refuses_calls_without_the_token(head: RayHead, tmp_path: Path) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{head.dashboard}/api/jobs/", timeout=10)
    assert refused.value.code == 401

    wrong = _raylens("jobs", "list", "--address", head.dashboard, token="not-the-token")
    assert wrong.returncode == 2 and "refused the given auth token" in wrong.stderr, wrong.stderr
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    env_home = {"HOME": str(empty_home)}
    missing = subprocess.run(
        [RAYLENS, "jobs", "list", "--address", head.dashboard],
        env={**clean_environment(), **env_home},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "refused the missing auth token" in missing.stderr, missing.stderr


def test_an_unknown_job_id_is_answered_with_where_to_find_the_jobs(head: RayHead) -> None:
    # `status`, `logs` and `stop` answer through the same client call (JobsClient._answers).
    unknown = _raylens("jobs", "status", "raylens-no-such-job", "--address", head.dashboard, token=head.token)
    said = " ".join(unknown.stderr.split())
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert f"no job 'raylens-no-such-job' on {head.dashboard}; `raylens jobs list --address" in said, said
    assert "Traceback" not in unknown.stderr


def test_a_job_that_fails_on_the_cluster_exits_non_zero_and_keeps_its_log(
    head: RayHead, tracking: str, tmp_path: Path
) -> None:
    spec = _project(tmp_path / "project")
    (tmp_path / "project" / "iris.csv").write_text("sepal,petal\n1,2\n")  # no target column
    done = _raylens(
        "submit",
        str(spec),
        "--address",
        head.dashboard,
        "--runs-dir",
        str(tmp_path / "runs"),
        "--tracking-uri",
        tracking,
        "--python",
        sys.executable,
        token=head.token,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "failed" in done.stderr and "raylens jobs logs" in done.stderr
    job_id = done.stdout.split("submitted job ")[1].split()[0]
    logs = _raylens("jobs", "logs", job_id, "--address", head.dashboard, token=head.token)
    assert "target" in logs.stdout  # the cluster's raylens named the missing column
