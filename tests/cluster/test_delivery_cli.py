"""The delivery commands as a user runs them: ``raylens serve`` prints where it serves
(127.0.0.1), answers HTTP and stops on Ctrl-C, an unknown alias is refused before Ray starts;
``raylens pipeline`` interrupted resumes from its step."""

from __future__ import annotations

import re
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from raylens.cluster.release import current_version, move_alias
from tests.cli import Invocation, raylens
from tests.cluster.test_pipeline import MODEL, write_rows, write_spec
from tests.cluster.test_serving import post, records
from tests.trainer.test_artifacts import Logged, cancer_models

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    (logged,) = cancer_models(tmp_path_factory.mktemp("serve-cli"), "cancer", epochs=(2,))
    client = mlflow.MlflowClient(logged.tracking_uri, registry_uri=logged.tracking_uri)
    move_alias(client, "cancer", "production", str(logged.registered_version), "first")
    return logged


def test_serve_answers_on_loopback_and_stops_on_ctrl_c(registered: Logged, tmp_path: Path) -> None:
    serving = Invocation(
        tmp_path, "serve", "cancer@production", "--tracking-uri", registered.tracking_uri, "--port", "0"
    )
    try:
        serving.wait_for_line("Serving", timeout=180)
        match = re.search(r"(http://127\.0\.0\.1:\d+)/predict", serving.output)
        assert match, serving.output
        url = match.group(1)
        status, body, _ = post(f"{url}/predict", {"dataframe_records": records(registered.raw_test.iloc[:4])})
        assert status == 200 and body["predictions"] == registered.expected[:4].tolist()
    finally:
        serving.process.send_signal(signal.SIGINT)
        code = serving.finish(timeout=120)
    assert code == 0, serving.output
    assert "Traceback" not in serving.output
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/health", timeout=5)


def test_a_port_in_use_or_too_many_replicas_are_refused_before_ray_starts(
    registered: Logged, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = raylens(tmp_path, "serve", "cancer@production", "--tracking-uri", registered.tracking_uri,
                       "--port", str(port))  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"127.0.0.1:{port} cannot be listened on" in done.stderr and "Traceback" not in done.stderr
    too_many = raylens(tmp_path, "serve", "cancer@production", "--tracking-uri", registered.tracking_uri,
                       "--replicas", "64")  # fmt: skip
    assert too_many.returncode == 2 and "64 replicas x 1 CPU need 64 CPUs" in too_many.stderr, too_many.stderr


def test_an_unknown_alias_is_refused_with_exit_2(registered: Logged, tmp_path: Path) -> None:
    done = raylens(tmp_path, "serve", "cancer@staging", "--tracking-uri", registered.tracking_uri)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "has no alias 'staging'" in done.stderr and "production → version 1" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_interrupted_pipeline_resumes_from_its_step(tmp_path: Path) -> None:
    """Ctrl-C during the smoke test: the pipeline run is marked, nothing is released; --resume
    continues the same run from the smoke test (the model is not trained again)."""
    write_rows(tmp_path / "rows.csv")
    write_spec(tmp_path)
    pipeline = Invocation(tmp_path, "pipeline", "spec.yaml")
    pipeline.wait_for_line("pipeline: smoke", timeout=300)
    pipeline.process.send_signal(signal.SIGINT)
    assert pipeline.finish(timeout=120) == 130, pipeline.output
    assert "raylens pipeline spec.yaml --resume" in pipeline.output
    assert "Traceback" not in pipeline.output
    uri = f"sqlite:///{tmp_path / 'raylens-runs' / 'mlflow.db'}"
    client = registry = mlflow.MlflowClient(uri, registry_uri=uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("churn").experiment_id], "tags.`raylens.role` = 'pipeline'"
    )
    assert run.info.status == "KILLED" and run.data.tags["raylens.pipeline.state"] == "interrupted"
    assert run.data.tags["raylens.pipeline.step.smoke"] == "interrupted"
    assert current_version(registry, MODEL, "production") is None

    resumed = raylens(tmp_path, "pipeline", "spec.yaml", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming pipeline run {run.info.run_id}" in resumed.stdout
    assert "pipeline: train" not in resumed.stdout  # the step that finished is not run again
    assert current_version(registry, MODEL, "production") == "1"
    assert client.get_run(run.info.run_id).data.tags["raylens.pipeline.state"] == "released"
