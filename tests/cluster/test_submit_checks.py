"""What `raylens submit` and `raylens jobs` check before they call a cluster: the address, the
token, the run folder, the tracking server and the upload's size. Nothing is uploaded when a
check fails."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from raylens.cluster.runtime import JobsEndpoint, auth_token, is_loopback
from raylens.cluster.submit import plan_submission, upload_size
from raylens.errors import UserError


@pytest.fixture
def listening() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (nothing is sent to it)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield int(server.getsockname()[1])


def test_the_token_is_found_where_ray_looks_for_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert auth_token({}, home) is None
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token({}, home) == "from-home"
    (tmp_path / "token").write_text("from-path")
    assert auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}, home) == "from-path"
    assert auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": "/nope"}, home) == "from-env"
    with pytest.raises(UserError, match=r"RAY_AUTH_TOKEN_PATH names .*nope.* cannot be read"):
        auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")}, home)


def test_a_cluster_off_this_machine_is_called_with_a_token_or_not_at_all(
    listening: int, tmp_path: Path
) -> None:
    no_token = {"environ": {}, "home": tmp_path}
    token = {"environ": {"RAY_AUTH_TOKEN": "secret"}, "home": tmp_path}
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("10.0.0.5") and not is_loopback("head.example.com")
    with pytest.raises(UserError, match=r"no Ray auth token found .*CVE-2023-48022.*--insecure"):
        JobsEndpoint.resolve("http://10.255.255.1:8265", **no_token)
    with pytest.raises(UserError, match=r"not a Jobs API address.*http://HEAD:8265"):
        JobsEndpoint.resolve("ray://127.0.0.1:10001", **token)
    with pytest.raises(UserError, match=r"nothing answers at http://127\.0\.0\.1:1 "):
        JobsEndpoint.resolve("http://127.0.0.1:1", **token)
    local = JobsEndpoint.resolve(f"http://127.0.0.1:{listening}/", **token)
    assert JobsEndpoint.resolve(f"http://127.0.0.1:{listening}", **no_token).headers == {}
    assert local.url == f"http://127.0.0.1:{listening}"
    assert local.headers == {"Authorization": "Bearer secret"}
    assert "secret" not in repr(local)


def _project(folder: Path) -> Path:
    folder.mkdir()
    (folder / "spec.yaml").write_text("name: x\n")
    (folder / "data.csv").write_bytes(b"a,b\n" * 1000)
    for left_out in (".git", ".venv", "raylens-runs", "__pycache__"):
        (folder / left_out).mkdir()
        (folder / left_out / "big.bin").write_bytes(b"\0" * 2**20)
    return folder / "spec.yaml"


def test_a_submission_runs_raylens_on_the_cluster_with_the_tracking_uri_in_its_environment(
    tmp_path: Path,
) -> None:
    spec = _project(tmp_path / "project")
    job = plan_submission(
        spec,
        spec_name="x",
        runs_dir="/mnt/shared/runs",
        tracking_uri="http://user:pw@mlflow:5000",
        overrides=["train.epochs=3"],
        python="/opt/conda/bin/python",
        now=datetime(2026, 11, 30, 12, 0, 0),
    )
    assert job.submission_id == "raylens-x-20261130-120000"
    assert job.entrypoint == (
        "/opt/conda/bin/python -m raylens.cluster.cli run spec.yaml --address auto "
        "--runs-dir /mnt/shared/runs --set train.epochs=3"
    )
    assert "mlflow" not in job.entrypoint  # the URI (and its password) is not on a command line
    assert job.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://user:pw@mlflow:5000"
    assert job.runtime_env["working_dir"] == str(tmp_path / "project")
    assert Path(job.runtime_env["py_modules"][0]).name == "raylens"
    assert {".git", ".venv", "raylens-runs", "__pycache__"} <= set(job.runtime_env["excludes"])
    assert job.upload_bytes == len(b"a,b\n" * 1000) + len("name: x\n")  # no excluded folder counted
    assert "http://user:pw@mlflow:5000" not in repr(job)


@pytest.mark.parametrize(
    ("runs_dir", "tracking_uri", "message"),
    [
        (None, "http://mlflow:5000", "--runs-dir: a submitted run writes .* every node"),
        ("raylens-runs", "http://mlflow:5000", "--runs-dir: .*absolute path"),
        ("s3://bucket/runs?secret_key=hunter2", "http://mlflow:5000", "credentials do not go in the URI"),
        ("/mnt/shared", None, "--tracking-uri: .*MLflow tracking server the cluster can reach"),
        ("/mnt/shared", "sqlite:////tmp/mlflow.db", "--tracking-uri: .*SQLite file"),
    ],
)
def test_a_submission_that_would_lose_its_results_is_refused(
    tmp_path: Path,
    runs_dir: str | None,
    tracking_uri: str | None,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = _project(tmp_path / "project")
    with pytest.raises(UserError, match=message) as refused:
        plan_submission(spec, spec_name="x", runs_dir=runs_dir, tracking_uri=tracking_uri)
    assert "hunter2" not in str(refused.value)


def test_object_storage_is_a_run_folder_the_cluster_reaches_with_its_own_credentials(tmp_path: Path) -> None:
    spec = _project(tmp_path / "project")
    uri = "s3://team-bucket/raylens-runs?region=eu-west-1"
    job = plan_submission(spec, spec_name="x", runs_dir=uri, tracking_uri="http://mlflow:5000")
    assert f"--runs-dir '{uri}'" in job.entrypoint  # quoted: the options' `&` stays in the argument
    assert not [k for k in job.runtime_env["env_vars"] if k.startswith("AWS_")]


def test_a_working_directory_over_the_limit_is_refused_naming_its_largest_entries(tmp_path: Path) -> None:
    spec = _project(tmp_path / "project")
    (tmp_path / "project" / "data").mkdir()
    (tmp_path / "project" / "data" / "rows.parquet").write_bytes(b"\1" * 3 * 2**20)
    size, largest = upload_size(tmp_path / "project")
    assert largest[0] == ("data", 3 * 2**20)
    with pytest.raises(
        UserError, match=r"3 MiB to upload, over --max-upload-mib 2; the largest: data \(3 MiB\)"
    ):
        plan_submission(
            spec, spec_name="x", runs_dir="/mnt/s", tracking_uri="http://m:5000", max_upload_mib=2
        )
    assert size > 3 * 2**20


def test_data_outside_the_uploaded_folder_is_refused_before_the_upload(tmp_path: Path) -> None:
    spec = _project(tmp_path / "project")
    settings = {"spec_name": "x", "runs_dir": "/mnt/s", "tracking_uri": "http://m:5000"}
    with pytest.raises(UserError, match=r"data.source \.\./rows.csv lies outside .*project, the folder"):
        plan_submission(spec, data_source="../rows.csv", **settings)
    for travels in ("data.csv", "sub/../data.csv", "/mnt/shared/rows.parquet", "sklearn:iris"):
        plan_submission(spec, data_source=travels, **settings)
