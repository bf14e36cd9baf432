"""Ctrl-C, SIGTERM and --resume of the real CLI, on embedded Ray and a real MLflow store.

One run of the spec is interrupted three times — SIGINT and SIGTERM during the sweep (two
different paths into Tune's graceful stop), SIGTERM during the final training — and resumed
after each. The resumed run must end exactly
where an uninterrupted run of the same spec ends (same trials stopped by ASHA, same best
configuration, same test metrics), in the same MLflow runs, with one value per epoch. Between
the interruptions, resumes that must be refused (edited spec, edited data, another command, a
second resume while one runs) are refused and write nothing.

The model sleeps in each training step (``slow_models``), so each stage lasts long enough to be
interrupted in; the uninterrupted baseline runs while another Ray cluster (`ray start --head`)
is up on the machine, which embedded mode must run beside.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import ray

from raylens import Experiment
from raylens.errors import UserError
from tests.cli import CliRun, Invocation, client, make_project, run_folder, runs_of, snapshot

pytestmark = pytest.mark.e2e


def final_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in (run_folder(folder) / "final").glob("checkpoint_*") if p.is_dir())


def assert_stopped_cleanly(folder: Path, invocation: Invocation, code: int) -> None:
    """Exit 128 + signal, the message saying what happened and how to resume, the runs the
    invocation had open KILLED (finished trials stay FINISHED), nothing registered."""
    assert invocation.finish() == code, invocation.output
    name = {130: "SIGINT", 143: "SIGTERM"}[code]
    said = " ".join(invocation.output.split())  # the terminal may wrap the line
    assert (
        f"interrupted by {name}: this run's open MLflow runs are marked KILLED and no model was registered; "
        "its checkpoints are kept. Continue it with: raylens run spec.yaml --resume"
    ) in said, invocation.output
    assert "Traceback" not in invocation.output, invocation.output
    runs = runs_of(folder)
    assert {run.info.status for run in runs} <= {"KILLED", "FINISHED"}
    assert [r.info.status for r in runs if r.data.tags.get("raylens.role") in ("experiment", "final")] == [
        "KILLED"
    ] * len([r for r in runs if r.data.tags.get("raylens.role") in ("experiment", "final")])
    assert not client(folder).search_model_versions("name='faults'")


def refused_resume(folder: Path, **stages: bool) -> str:
    """``--resume`` of the project's latest run, refused before anything starts (no Ray)."""
    with pytest.raises(UserError) as refused:
        Experiment.from_yaml(folder / "spec.yaml", folder / "raylens-runs").run(resume=True, **stages)
    assert not ray.is_initialized()
    return str(refused.value)


def outcome(folder: Path) -> tuple[str, list[tuple[str, str]], dict[str, str], dict[str, float]]:
    """The feature-set version, each trial's configuration and whether ASHA stopped it, the best
    configuration (root run) and the test metrics (final run) a run ended with."""
    runs = runs_of(folder)
    (root,) = [r for r in runs if r.data.tags.get("raylens.role") == "experiment"]
    (final,) = [r for r in runs if r.data.tags.get("raylens.role") == "final"]
    trials = sorted(
        (r.data.params["train.optimizer.lr"], r.data.tags["raylens.stopped_early"])
        for r in runs
        if r.data.tags.get("raylens.role") == "trial"
    )
    best = {k: v for k, v in root.data.params.items() if k.startswith("best.")}
    tests = {k: v for k, v in final.data.metrics.items() if k.startswith("test_")}
    return root.data.tags["raylens.feature_set_version"], trials, best, tests


def test_interrupted_three_times_and_resumed_ends_like_the_uninterrupted_run(
    tmp_path: Path, reference_run: CliRun
) -> None:
    folder = make_project(tmp_path / "project")

    # 1. SIGINT during the sweep, once a trial has finished.
    first = Invocation(folder, "run", "spec.yaml")
    first.wait_for_line("trial ")
    first.process.send_signal(signal.SIGINT)
    assert_stopped_cleanly(folder, first, 130)
    root_ids = {r.info.run_id for r in runs_of(folder) if r.data.tags.get("raylens.role") == "experiment"}
    assert len(root_ids) == 1

    # Resumes that must be refused write nothing. (Through the Python API, which the CLI calls:
    # the CLI's own path from such a refusal to exit 2 is `tests/faults/test_bad_inputs.py`'s.)
    before = snapshot(folder)
    spec = (folder / "spec.yaml").read_text()
    (folder / "spec.yaml").write_text(spec.replace("epochs: 8", "epochs: 9"))
    assert "train.epochs: 8 → 9" in refused_resume(folder)
    (folder / "spec.yaml").write_text(spec)
    data = (folder / "iris.csv").read_text()
    (folder / "iris.csv").write_text(data + "5.0,3.0,1.5,0.2,0\n")
    assert "the data of 'iris.csv' changed" in refused_resume(folder)
    (folder / "iris.csv").write_text(data)
    assert "resume it with `raylens run SPEC --resume`" in refused_resume(folder, tune=False)
    assert snapshot(folder) == before

    # 2. SIGTERM during the resumed sweep.
    second = Invocation(folder, "run", "spec.yaml", "--resume")
    second.wait_for_line("trial ")
    second.process.send_signal(signal.SIGTERM)
    assert_stopped_cleanly(folder, second, 143)

    # 3. SIGTERM during the final training, after its first checkpoint. (SIGINT there takes the
    # same path: both signals raise the same exception, tests/cluster/test_interrupt.py.)
    third = Invocation(folder, "run", "spec.yaml", "--resume")
    third.wait_for_line("Training")
    third.wait_for(lambda: len(final_checkpoints(folder)) >= 1)
    third.process.send_signal(signal.SIGTERM)
    assert_stopped_cleanly(folder, third, 143)

    # 4. The last resume finishes; a second resume of the same run meanwhile is refused.
    last = Invocation(folder, "run", "spec.yaml", "--resume")
    last.wait_for_line("Starting Ray")
    assert "is in use by another raylens process" in refused_resume(folder)
    assert last.finish() == 0, last.output

    # Same features, same trials stopped by ASHA, same best configuration and test metrics as
    # the uninterrupted run: resumes change nothing, and (each stage having started afresh in
    # another process, results arriving in another order) the same spec and seed give the same
    # result.
    uninterrupted = reference_run.folder
    assert outcome(folder) == outcome(uninterrupted)
    _, trials, best, tests = outcome(folder)
    assert any(stopped == "true" for _, stopped in trials), "ASHA stopped no trial here"
    assert best and tests, "nothing to compare"
    runs = runs_of(folder)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_id for r in runs if r.data.tags.get("raylens.role") == "experiment"} == root_ids
    roles = sorted(r.data.tags.get("raylens.role") for r in runs)
    assert roles == ["experiment", "final"] + ["trial"] * 4  # no duplicate run for a resumed trial or run
    mlflow = client(folder)
    for run in runs:
        if run.data.tags["raylens.role"] != "experiment":
            steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "valid_loss")]
            expected = 8 if run.data.tags["raylens.role"] == "final" else 3
            if run.data.tags.get("raylens.stopped_early") == "true":  # stopped at a milestone
                expected = len(steps)
            assert steps == list(range(1, expected + 1)), (run.info.run_name, steps)
    (version,) = mlflow.search_model_versions("name='faults'")
    assert version.run_id == next(r.info.run_id for r in runs if r.data.tags["raylens.role"] == "final")
