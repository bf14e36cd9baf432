"""Shared fixtures. Tests run real Ray (a local cluster with a few logical CPUs) and real MLflow
(SQLite in a temporary folder); nothing is mocked."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from raylens.features import DataConfig, FeaturesConfig, FeatureSet, build_feature_set
from tests.cli import CliRun, make_project, other_ray_cluster, raylens
from tests.servers import S3Server, s3_server

REPO = Path(__file__).parents[1]
# Tests send nothing beyond this machine: no usage reports from MLflow or Ray (subprocesses inherit it).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray with 4 logical CPUs for every test that needs one (starting Ray costs
    seconds). The CLI's embedded mode starts a cluster of its own beside it (``address="local"``)."""
    import ray

    assert not ray.is_initialized(), "a previous test leaked a Ray session"
    ray.init(
        address="local",  # a cluster of its own, even beside one started with `ray start`
        num_cpus=4,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
        # Workers import test models (tests.faults.slow_models) as the driver does.
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}},
    )
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_leaked_mlflow_settings() -> Iterator[None]:
    """A test that leaves MLflow's process-wide tracking URI set changes where every later test
    of the process loads and logs models: fail it. (Its environment variables are put back.)"""
    from mlflow.tracking._tracking_service import utils

    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    uri_before = utils._tracking_uri
    # MLflow's default store is ./mlflow.db: a call that forgot its tracking or registry URI
    # (MLflow's own models:/ resolution, for one) creates it in the working folder.
    default_stores = [Path.cwd() / "mlflow.db", Path.cwd() / "mlruns"]
    existed = [store.exists() for store in default_stores]
    yield
    created = [str(s) for s, e in zip(default_stores, existed, strict=True) if s.exists() and not e]
    assert not created, f"the test wrote to MLflow's default store: {created}"
    leaked = utils._tracking_uri != uri_before
    utils._tracking_uri = uri_before
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(saved)
    assert not leaked, "the test left MLflow's global tracking URI set"


@pytest.fixture(autouse=True)
def no_leaked_process_group() -> Iterator[None]:
    yield
    import torch.distributed as dist

    leaked = dist.is_available() and dist.is_initialized()
    if leaked:
        dist.destroy_process_group()
    assert not leaked, "test left a torch.distributed process group initialised"


def iris_feature_set(folder: Path) -> FeatureSet:
    return build_feature_set(
        "iris",
        DataConfig(source="sklearn:iris", target="target", split={"valid": 0.2, "test": 0.2, "seed": 0}),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        folder / "store",
    )


@pytest.fixture
def iris(tmp_path: Path) -> FeatureSet:
    return iris_feature_set(tmp_path)


class ModelVenv:
    """A fresh virtual environment with only a logged model's requirements (what a user serving
    the model installs). Installing takes about a minute of mostly disk work, so it starts in the
    background when the test that needs it is collected, and is waited for by that test."""

    def __init__(self, folder: Path) -> None:
        from raylens.trainer.artifacts import pip_requirements

        self.folder = folder
        self.python = folder / "venv" / "bin" / "python"
        self.log = folder / "install.log"
        requirements = folder / "requirements.txt"
        folder.mkdir(parents=True, exist_ok=True)
        requirements.write_text("\n".join(pip_requirements()) + "\n")
        # --no-compile: byte-compiling torch and MLflow would double pip's time; Python compiles
        # what the server imports on first use.
        script = (
            f"{sys.executable} -m venv {folder / 'venv'} && "
            f"{self.python} -m pip install -q --no-compile -r {requirements}"
        )
        self.process = subprocess.Popen(
            ["bash", "-c", script],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> Path:
        returncode = self.process.wait(timeout=timeout)
        assert returncode == 0, self.log.read_text()[-3000:]
        return self.python

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


_MODEL_VENV: list[ModelVenv] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The test that needs the model's fresh environment goes last: it installs meanwhile.
    items.sort(key=lambda item: "model_venv" in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session: pytest.Session) -> None:
    if any("model_venv" in getattr(item, "fixturenames", ()) for item in session.items):
        _MODEL_VENV.append(ModelVenv(Path(tempfile.mkdtemp(prefix="raylens-model-venv-"))))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Background work a stopped session did not wait for: never leave it running, nor its files."""
    for venv in _MODEL_VENV:
        venv.stop()
        shutil.rmtree(venv.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def model_venv() -> ModelVenv:
    if not _MODEL_VENV:
        _MODEL_VENV.append(ModelVenv(Path(tempfile.mkdtemp(prefix="raylens-model-venv-"))))
    return _MODEL_VENV[0]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """One uninterrupted ``raylens run`` of the reference project (``tests/cli.py``), shared by
    the end-to-end tests and the fault tests that compare against it. It runs while another Ray
    cluster (`ray start --head`) is up on the machine: embedded mode must start its own beside it."""
    folder = make_project(tmp_path_factory.mktemp("reference"))
    with other_ray_cluster():
        done = raylens(folder, "run", "spec.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    return CliRun(folder, done)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3 API on 127.0.0.1 (moto's server) with a bucket ``raylens``; ``s3.env`` reaches it."""
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3``, with this process's environment set to reach it (as a node's would be)."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3
