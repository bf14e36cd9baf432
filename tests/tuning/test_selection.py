"""Algorithm selection on real Ray Tune and MLflow: one sweep across scikit-learn and torch
candidates, ranked on a leaderboard with measured costs; Optuna's TPE, grid search and Tune's
schedulers; constraints that leave no winner."""

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from raylens.cluster.console import sweep_debug_table
from raylens.cluster.invocation import debug_of_sweep, leaderboard_of_run
from raylens.errors import UserError
from raylens.features import FeatureSet
from raylens.trainer import SklearnModelConfig, TorchModelConfig, TrainConfig
from raylens.trainer.config import OptimizerConfig
from raylens.trainer.debug.settings import DebugConfig
from raylens.trainer.tracking import MlflowTracker
from raylens.tuning import TuneConfig
from raylens.tuning.candidates import EarlierTrial
from raylens.tuning.leaderboard import LEADERBOARD, Leaderboard
from raylens.tuning.sweep import SweepResult, nothing_finished, run_sweep
from raylens.tuning.tracking import TrialEvent
from raylens.tuning.trial import STOPPED_BY_RULE
from tests.cli import RAYLENS
from tests.trainer.test_classification import bundled

pytestmark = pytest.mark.usefixtures("ray_cluster")

LOGISTIC = {"family": "sklearn", "name": "logistic_regression"}
WIDE = {**os.environ, "COLUMNS": "200"}
"""A terminal wide enough that the table prints each trial id on one line."""


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    return bundled("breast_cancer", tmp_path_factory.mktemp("cancer"))


def sweep(
    fs: FeatureSet,
    folder: Path,
    tune: TuneConfig,
    model: Any = None,
    epochs: int = 2,
    train: TrainConfig | None = None,
    **how: Any,
) -> tuple[SweepResult, MlflowTracker, str]:
    folder.mkdir(parents=True, exist_ok=True)
    tracker = MlflowTracker(f"sqlite:///{folder}/mlflow.db", "selection", folder / "artifacts")
    parent = tracker.start_run("sweep")
    try:
        result = run_sweep(
            tune,
            model or TorchModelConfig(params={"hidden": [8]}),
            train or TrainConfig(epochs=epochs, batch_size=32),
            fs,
            tracker=tracker,
            parent_run_id=parent,
            storage_path=folder / "ray",
            run_name="sweep",
            **how,
        )
    finally:
        tracker.end_run(parent)
    return result, tracker, parent


def test_one_sweep_ranks_scikit_learn_and_torch_candidates_with_their_costs(
    cancer: FeatureSet, tmp_path: Path
) -> None:
    tune = TuneConfig(
        trials=6,
        concurrency=2,
        scheduler="fifo",
        metric="valid_accuracy",
        mode="max",
        candidates=[
            {"model": LOGISTIC, "space": {"model.params.C": "loguniform(0.01, 10)"}},
            {
                "model": {"family": "sklearn", "name": "random_forest", "params": {"n_estimators": 10}},
                "space": {"model.params.max_depth": "randint(2, 6)"},
            },
            {
                "name": "mlp",
                "model": {"name": "mlp", "params": {"hidden": [16]}},
                "space": {"train.optimizer.lr": "loguniform(1e-3, 3e-2)"},
            },
        ],
    )
    result, tracker, parent = sweep(cancer, tmp_path, tune)
    board = result.leaderboard
    assert board is not None and len(board.rows) == 6
    scores = [row.score for row in board.rows]
    assert scores == sorted(scores, reverse=True)
    assert {row.candidate for row in board.rows} >= {"sklearn.logistic_regression", "sklearn.random_forest"}
    for row in board.rows:
        costs = row.costs
        assert costs.train_seconds > 0 and costs.peak_rss_mb and costs.peak_rss_mb > 0
        assert costs.predict_p50_ms and 0 < costs.predict_p50_ms <= costs.predict_p95_ms  # type: ignore[operator]
        assert costs.model_mb and costs.model_mb > 0
    # Each candidate's best has its permutation importances, named by feature column.
    explained = [row for row in board.rows if row.importances]
    assert len(explained) == len({row.candidate for row in board.rows})
    assert all(name in cancer.feature_columns for row in explained for name, _ in row.importances)
    assert any(row.pareto for row in board.rows) and board.rows[0].pareto  # the best is never beaten
    winner = board.winner
    assert winner is board.rows[0] and result.best_config == winner.config
    family = {"mlp": "torch"}.get(winner.candidate, "sklearn")
    assert next(iter(result.best_config)) == "model" and result.best_config["model"]["family"] == family

    # The leaderboard is a value of the sweep's run; the winner's trial run is tagged.
    logged = Path(tracker.client.download_artifacts(parent, LEADERBOARD, str(tmp_path)))
    assert Leaderboard.from_dict(json.loads(logged.read_text())) == board
    artifacts = {a.path for a in tracker.client.list_artifacts(parent, "plots")}
    assert {
        "plots/pareto_front.png",
        "plots/trials_learning_curves.png",
        "plots/parallel_coordinates.png",
        "plots/parameter_importance.png",
    } <= artifacts
    # fANOVA over the six trials: the candidate is among what it weighs, the shares add up to 1.
    assert "candidate" in board.parameter_importances
    assert sum(board.parameter_importances.values()) == pytest.approx(1.0)
    tagged = tracker.client.search_runs([tracker.experiment_id], "tags.`raylens.best_trial` = 'true'")
    assert len(tagged) == 1 and tagged[0].data.tags["mlflow.parentRunId"] == parent
    assert tagged[0].data.tags["raylens.candidate"] == winner.candidate
    assert tagged[0].data.tags["raylens.model_family"] == family

    # `raylens leaderboard RUN_ID` prints it again; a run that is not a sweep's is named.
    uri = ["--tracking-uri", tracker.tracking_uri]
    shown = subprocess.run([RAYLENS, "leaderboard", parent, *uri], capture_output=True, text=True, env=WIDE)
    assert shown.returncode == 0, shown.stderr
    assert f"winner: {winner.candidate} (trial {winner.trial_id})" in shown.stdout
    assert "what mattered (share of valid_accuracy's variance, fANOVA): " in shown.stdout
    assert all(row.trial_id in shown.stdout for row in board.rows) and shown.stderr == ""
    not_a_sweep = r"holds no leaderboard \(it is not the root run of a finished sweep\)"
    with pytest.raises(UserError, match=not_a_sweep):
        leaderboard_of_run(tracker.tracking_uri, tagged[0].info.run_id)


def test_a_failed_trial_is_retried_and_constraints_no_trial_meets_leave_no_winner(
    cancer: FeatureSet, tmp_path: Path
) -> None:
    """The trial fails once and is retried (``trial_retries``), finishes, and is ranked; no trial
    meets the constraints, so the sweep ends naming the closest one."""
    marker = tmp_path / "failed-once"
    tune = TuneConfig(
        trials=1,
        concurrency=1,
        scheduler="fifo",
        trial_retries=1,
        space={"model.params.marker": f"choice([{str(marker)!r}])"},
        constraints={"model_mb": 1e-6},
    )
    with pytest.raises(UserError, match=r"no trial meets tune\.constraints \(model_mb ≤ 1e-06\); closest: "):
        sweep(cancer, tmp_path, tune, TorchModelConfig(name="tests.faults.slow_models:fails_once"))
    assert marker.exists()


def test_a_multi_objective_search_shows_the_front_of_the_metric_against_training_time(
    cancer: FeatureSet, tmp_path: Path
) -> None:
    tune = TuneConfig(
        trials=5,
        concurrency=2,
        search="tpe",
        scheduler="fifo",
        metric="valid_accuracy",
        mode="max",
        objectives=[{"metric": "time_total_s", "mode": "min"}],
        space={"model.params.n_estimators": "randint(2, 60)", "model.params.max_depth": "randint(1, 8)"},
    )
    forest = SklearnModelConfig(name="random_forest")
    result, tracker, parent = sweep(cancer, tmp_path, tune, forest)
    board = result.leaderboard
    assert board is not None and board.objectives == {"time_total_s": "min"}
    assert all(row.objectives["time_total_s"] > 0 for row in board.rows)
    # The front: no trial on it is beaten on both; every trial off it is beaten by one on it.
    on = [row for row in board.rows if row.trial_id in board.front]
    off = [row for row in board.rows if row.trial_id not in board.front]
    assert board.rows[0] in on and board.winner is board.rows[0]  # the best on the metric wins

    def beats(a: Any, b: Any) -> bool:
        at, bt = a.objectives["time_total_s"], b.objectives["time_total_s"]
        return a.score >= b.score and at <= bt and (a.score > b.score or at < bt)

    assert not any(beats(a, b) for a in on for b in on)
    assert all(any(beats(a, b) for a in on) for b in off)
    artifacts = {a.path for a in tracker.client.list_artifacts(parent, "plots")}
    assert "plots/objectives_front.png" in artifacts

    # Refused before any trial starts.
    with pytest.raises(UserError, match=r"tune\.objectives: a search for several objectives is Optuna's"):
        sweep(cancer, tmp_path / "random", tune.model_copy(update={"search": "random"}), forest)
    wrong = TuneConfig.model_validate({**tune.model_dump(), "objectives": [{"metric": "valid_acuracy"}]})
    with pytest.raises(
        UserError, match=r"'valid_acuracy' is not a metric .* \(did you mean 'valid_accuracy'"
    ):
        sweep(cancer, tmp_path / "wrong", wrong, forest)
    with pytest.raises(ValueError, match="valid_accuracy is an objective twice"):
        TuneConfig(metric="valid_accuracy", objectives=[{"metric": "valid_accuracy", "mode": "max"}])


def test_tpe_with_median_stopping_and_grid_search_run_their_trials(
    cancer: FeatureSet, tmp_path: Path
) -> None:
    tpe = TuneConfig(
        trials=4,
        concurrency=2,
        search="tpe",
        scheduler="median",
        space={
            "model.params.max_depth": "randint(1, 6)",
            "model.params.criterion": "choice(['gini', 'entropy'])",
        },
    )
    forest = SklearnModelConfig(name="random_forest", params={"n_estimators": 8})
    earlier = [  # a warm start: an earlier sweep's trials, one of them outside this space
        EarlierTrial(
            "sklearn.random_forest", {"model.params.max_depth": 4, "model.params.criterion": "gini"}, 0.95
        ),
        EarlierTrial(
            "sklearn.random_forest", {"model.params.max_depth": 9, "model.params.criterion": "gini"}, 0.9
        ),
    ]
    notes: list[str] = []
    result, *_ = sweep(
        cancer, tmp_path / "tpe", tpe, forest, epochs=4, warm_start=earlier, on_notice=notes.append
    )
    assert len(result.trials) == 4 and all(t.status in ("completed", "stopped") for t in result.trials)
    assert set(result.best_config) == {"model.params.max_depth", "model.params.criterion"}
    assert notes == [
        "warm start: 1 earlier value(s) of model.params.max_depth outside this sweep's space were dropped"
    ]

    grid = TuneConfig(
        trials=99,  # grid search tries every combination once
        concurrency=2,
        search="grid",
        scheduler="fifo",
        space={"model.params.C": "choice([0.1, 1.0])", "model.params.fit_intercept": "choice([True, False])"},
    )
    result, *_ = sweep(cancer, tmp_path / "grid", grid, SklearnModelConfig(**LOGISTIC))
    tried = sorted(
        (t.config["model.params.C"], t.config["model.params.fit_intercept"]) for t in result.trials
    )
    assert tried == [(0.1, False), (0.1, True), (1.0, False), (1.0, True)]


def test_pbt_goes_on_from_a_leading_trials_checkpoint_with_perturbed_values(
    cancer: FeatureSet, tmp_path: Path
) -> None:
    tune = TuneConfig(
        trials=3,
        concurrency=3,  # the whole population at once
        scheduler="pbt",
        grace_period=1,
        seed=3,
        space={"train.optimizer.lr": "loguniform(1e-5, 1e-1)"},
    )
    events: list[TrialEvent] = []
    result, *_ = sweep(
        cancer, tmp_path, tune, TorchModelConfig(params={"hidden": [8]}), epochs=2, on_event=events.append
    )
    first = {e.trial_id: e.config["train.optimizer.lr"] for e in reversed(events) if e.kind == "started"}
    last = {t.trial_id: t.config["train.optimizer.lr"] for t in result.trials}
    assert len(first) == 3 and all(t.status == "completed" for t in result.trials)
    exploited = [trial for trial, lr in last.items() if lr != first[trial]]
    assert exploited, "PBT perturbed no trial"
    assert all(last[trial] not in first.values() for trial in exploited)  # perturbed, not copied


def test_a_time_budget_ends_the_sweep(cancer: FeatureSet, tmp_path: Path) -> None:
    budget = TuneConfig(
        trials=500,
        concurrency=2,  # two trials always running: the budget runs out in the middle of one
        scheduler="fifo",
        time_budget_s=10,  # the first trials' processes start in time on a slow machine
        space={"train.optimizer.lr": "loguniform(1e-3, 1e-1)"},
    )
    slow = TorchModelConfig(
        name="tests.faults.slow_models:build", params={"hidden": [8], "step_seconds": 0.03}
    )
    began = time.monotonic()
    result, tracker, parent = sweep(cancer, tmp_path, budget, slow, epochs=3)
    assert 0 < len(result.trials) < 500 and time.monotonic() - began < 60
    assert any(trial.status == "stopped" for trial in result.trials)
    # A trial the budget cut short is stopped where it stood (no winner on fewer epochs), its run
    # closed finished, like the rest, not left killed.
    for trial in result.trials:
        assert trial.status == ("completed" if trial.metrics.get("epoch") == 3 else "stopped"), trial
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert runs and all(run.info.status == "FINISHED" for run in runs)
    tags = [run.data.tags for run in runs]
    stopped = {tag["raylens.trial_id"] for tag in tags if tag["raylens.stopped_early"] == "true"}
    assert stopped == {t.trial_id for t in result.trials if t.status == "stopped"}
    # A budget spent before any trial finished says so.
    said = nothing_finished(budget.model_copy(update={"time_budget_s": 0.5}), [], [], took=3.0)
    assert "time budget of 0.5 s ran out before a trial finished: raise tune.time_budget_s" in said


def test_a_debugger_rule_stops_a_trial_and_the_sweep_goes_on(cancer: FeatureSet, tmp_path: Path) -> None:
    tune = TuneConfig(
        trials=2,
        concurrency=2,
        search="grid",
        scheduler="fifo",
        trial_retries=1,  # a stopped trial is not retried into training again
        space={"train.optimizer.lr": "choice([0.01, 1000.0])"},
    )
    train = TrainConfig(
        epochs=2,
        batch_size=32,
        optimizer=OptimizerConfig(name="sgd", lr=0.01),
        debug=DebugConfig(every=2, rules={"exploding_tensor": "stop"}),
    )
    result, tracker, parent = sweep(cancer, tmp_path, tune, train=train)
    status = {t.config["train.optimizer.lr"]: t.status for t in result.trials}
    assert status == {0.01: "completed", 1000.0: "stopped"}
    assert result.best_config["train.optimizer.lr"] == 0.01
    # Its retry read why it stopped and ended at once, instead of training into the rule again.
    (why,) = (tmp_path / "ray" / "sweep").glob(f"*/{STOPPED_BY_RULE}")
    assert why.read_text().startswith("debug rule exploding_tensor")
    trials = debug_of_sweep(tracker.tracking_uri, parent)
    stopped = next(t for t in trials if t.stopped_by)
    assert stopped.stopped_by is not None and stopped.stopped_by.startswith("debug rule exploding_tensor")
    assert stopped.status == "FINISHED" and stopped.rules == ["exploding_tensor"]
    table = Console(width=200, record=True)
    table.print(sweep_debug_table(trials, "sweep"))  # what `raylens debug --sweep` prints
    assert "exploding_tensor" in table.export_text()
    healthy = next(t for t in trials if t.name.startswith("trial-") and not t.stopped_by)
    # On a desktop (DISPLAY set), --html opens the report in the browser: here a script $BROWSER
    # names, as Python's webbrowser module honours it.
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {tmp_path / "opened.txt"}\n')
    browser.chmod(0o755)
    shown = subprocess.run(
        [RAYLENS, "debug", healthy.run_id, "--html", "--tracking-uri", tracker.tracking_uri],
        capture_output=True,
        text=True,
        env={**WIDE, "DISPLAY": ":99", "BROWSER": f"{browser} %s"},
    )
    assert shown.returncode == 0 and "timeline (rank 0)" in shown.stdout, shown.stderr
    local = Path(shown.stdout.split("report: ")[1].split()[0])
    assert (tmp_path / "opened.txt").read_text().strip() == local.as_uri()
    report = local.read_text()
    assert (
        "<h2>Findings</h2>" in report and report.count('<img src="data:image/png;base64,') == 4
    )  # gradient norms, activations, step times, alpha and noise
