"""The bad-input corpus: every spec in ``bad_inputs/`` is a mistake a user makes. Each must end
with exit 2 and one message (no traceback) that contains the text its ``# expect:`` line gives,
and leave the run folder, feature store and MLflow store byte-identical.

A spec's header may also say ``# args: ...`` (extra CLI options), ``# command: ...`` (default
run) and ``# setup: delete-experiment`` (the experiment is deleted in MLflow first, as in the UI).
The run folder each case starts from already holds a feature set and an MLflow store with a run,
so "nothing written" is checked against a store that has something to lose.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raylens.cluster.cli import app
from raylens.features import DataConfig, FeaturesConfig, build_feature_set
from raylens.trainer.tracking import MlflowTracker

CASES = Path(__file__).parent / "bad_inputs"
SPECS = sorted(CASES.glob("*.yaml"))


def header(spec: Path) -> dict[str, str]:
    found = {}
    for line in spec.read_text().splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        found[key] = value
    return found


@pytest.fixture(scope="module")
def populated_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a feature set and an MLflow store holding a finished run."""
    root = tmp_path_factory.mktemp("populated") / "runs"
    build_feature_set(
        "bad", DataConfig(source="sklearn:iris", target="target"), FeaturesConfig(), root / "features"
    )
    tracker = MlflowTracker(f"sqlite:///{root / 'mlflow.db'}", "bad", root / "mlartifacts")
    run = tracker.start_run("earlier")
    tracker.log_metrics(run, {"valid_loss": 0.5}, step=1)
    tracker.end_run(run)
    return root


@pytest.fixture
def cli_process_state() -> Iterator[None]:
    """The CLI quiets its own process (env, warning filters): put the test process back."""
    saved = dict(os.environ)
    with warnings.catch_warnings():
        yield
    os.environ.clear()
    os.environ.update(saved)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_corpus_is_large_and_every_case_says_what_it_expects() -> None:
    assert len(SPECS) >= 25
    assert all(header(spec).get("expect") for spec in SPECS)
    data_files = {p.name for p in (CASES / "data").iterdir() if p.name != "README.md"}
    used = " ".join(spec.read_text() for spec in SPECS)
    assert all(f"data/{name}" in used for name in data_files)  # every bad data file has its case


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(
    spec: Path, populated_runs: Path, tmp_path: Path, cli_process_state: None
) -> None:
    settings = header(spec)
    runs = tmp_path / "runs"
    shutil.copytree(populated_runs, runs)
    if settings.get("setup") == "delete-experiment":
        tracker = MlflowTracker(f"sqlite:///{runs / 'mlflow.db'}", "bad")
        tracker.client.delete_experiment(tracker.experiment_id)
    before = snapshot(runs)

    args = [
        settings.get("command", "run"),
        str(spec),
        "--runs-dir",
        str(runs),
        *settings.get("args", "").split(),
    ]
    result = CliRunner().invoke(app, args)
    output = result.output  # stdout and stderr, interleaved as a terminal shows them

    assert result.exit_code == 2, output
    assert settings["expect"] in " ".join(output.split()), output  # rich wraps long lines
    assert output.count("error:") == 1 and "Traceback" not in output, output
    assert "hunter2" not in output  # a password in a URI is never shown
    assert snapshot(runs) == before
