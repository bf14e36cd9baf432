"""``raylens serve`` as a user runs it: it prints where it serves (127.0.0.1), answers HTTP, and
stops on Ctrl-C; an unknown alias is refused before Ray starts."""

from __future__ import annotations

import re
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest

from raylens.cluster.release import move_alias
from raylens.features import DataConfig, FeaturesConfig, build_feature_set
from tests.cli import Invocation, raylens
from tests.cluster.test_serving import post, records
from tests.trainer.test_artifacts import Logged, train_and_log

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    folder = tmp_path_factory.mktemp("serve-cli")
    import_path = list(sys.path)
    fs = build_feature_set(
        "cancer",
        DataConfig(source="sklearn:breast_cancer", target="target"),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        folder / "store",
    )
    logged = train_and_log(fs, folder, epochs=2, register_as="cancer")
    sys.path[:] = import_path
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


def test_an_unknown_alias_is_refused_with_exit_2(registered: Logged, tmp_path: Path) -> None:
    done = raylens(tmp_path, "serve", "cancer@staging", "--tracking-uri", registered.tracking_uri)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "has no alias 'staging'" in done.stderr and "production → version 1" in done.stderr
    assert "Traceback" not in done.stderr
