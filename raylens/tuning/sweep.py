"""A sweep: Ray Tune trials that each call the same training function.

Terms: a *sweep* is one search over a space; a *trial* is one sampled configuration trained and
reported epoch by epoch. A trial with one worker trains in its own process on the shared arrays
(placed in the object store once, read zero-copy by every trial); a trial with several workers
launches a Ray Train run of that size, through the same bridge the final training uses.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import (
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
)
from ray.tune.search import BasicVariantGenerator
from ray.tune.stopper import CombinedStopper, MaximumIterationStopper
from ray.util.queue import Empty, Queue

from raylens.errors import UserError
from raylens.features import FeatureSet
from raylens.interrupts import Interrupted
from raylens.storage import Location, ray_storage
from raylens.trainer import AnyModelConfig, TrainConfig, TrainJob
from raylens.trainer.family import family_of, stopped_by_rule
from raylens.trainer.plots import (
    importance_figure,
    parallel_coordinates_figure,
    pareto_figure,
    trials_figure,
)
from raylens.trainer.ray_train import beside_the_driver, train_distributed
from raylens.trainer.tracking import Tracker
from raylens.tuning.candidates import (
    WARM_STUDY,
    Candidate,
    DefineByRun,
    EarlierTrial,
    candidate_named,
    candidates_of,
    check_objectives,
    check_search,
    quiet_optuna,
    seeded_study,
    spec_values,
)
from raylens.tuning.config import TuneConfig
from raylens.tuning.halving import (
    HalvingRule,
    OrderedHalvingScheduler,
    reported_results,
    score,
    trial_number,
)
from raylens.tuning.leaderboard import (
    LEADERBOARD,
    Costs,
    Leaderboard,
    Row,
    latency_ms,
    misses,
    model_mb,
    objectives_front,
    parameter_importances,
    pareto_front,
    permutation_importances,
    raise_without_winner,
    ranked,
)
from raylens.tuning.plan import ConcurrencyPlan, plan_concurrency, population_refusal
from raylens.tuning.tracking import (
    SweepTracking,
    TrialEvent,
    TrialRecorder,
    error_line,
    relay_name,
    release,
    trial_metrics,
)
from raylens.tuning.trial import job_of_trial, run_trial


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, float]
    status: str
    """completed | stopped (by the halving rule, at epoch ``stopped_at``) | failed"""
    stopped_at: int | None = None
    order: int = 0
    """The order in which the searcher created the trial (ties go to the earlier one)."""


@dataclass(frozen=True)
class SweepResult:
    best_config: dict[str, Any]
    """The winner's values as spec paths (with several candidates, ``model`` first)."""
    best_metrics: dict[str, float]
    trials: list[TrialSummary]
    plan: ConcurrencyPlan
    leaderboard: Leaderboard | None = None


def _distributed_trial(
    config: dict[str, Any],
    *,
    job: TrainJob,
    candidates: list[Candidate],
    feature_set: FeatureSet,
    storage: str,
    checkpoints_to_tune: bool,
) -> None:
    """A trial of several workers: it drives a Ray Train run of its own, which keeps its
    checkpoints; a retried or resumed trial goes on in that run. ``checkpoints_to_tune``
    (PBT, which clones a trial's checkpoint into another): each epoch is reported with its
    checkpoint, and a trial Tune hands a checkpoint starts a new run from it."""
    trial_job = job_of_trial(job, config, candidates)
    context = tune.get_context()
    run_name = f"{context.get_experiment_name()}-{context.get_trial_id()}"
    start_from = tune.get_checkpoint() if checkpoints_to_tune else None
    if start_from is not None:
        # The trial's own run may be ahead of (or behind) the checkpoint it goes on from.
        run_name += "-" + hashlib.sha256(start_from.path.encode()).hexdigest()[:8]
    train_distributed(
        trial_job,
        feature_set,
        run_name=run_name,
        storage_path=Location.of(storage),
        on_epoch=lambda metrics: None if checkpoints_to_tune else tune.report(metrics),
        on_checkpoint=(
            (lambda metrics, checkpoint: tune.report(metrics, checkpoint=checkpoint))
            if checkpoints_to_tune
            else None
        ),
        start_from=start_from,
    )


def run_sweep(
    config: TuneConfig,
    model: AnyModelConfig,
    train: TrainConfig,
    feature_set: FeatureSet,
    *,
    tracker: Tracker,
    parent_run_id: str,
    storage_path: Path | str | Location,
    run_name: str,
    resume: bool = False,
    on_event: Callable[[TrialEvent], None] = lambda event: None,
    known_runs: Mapping[str, str] | None = None,
    on_run_created: Callable[[str, str], None] = lambda trial_id, run_id: None,
    warm_start: list[EarlierTrial] | None = None,
    on_notice: Callable[[str], None] = lambda text: None,
) -> SweepResult:
    """Run the sweep on the connected Ray cluster and return the best completed configuration.

    With ``resume`` an interrupted sweep at ``storage_path / run_name`` goes on: finished trials
    are kept, interrupted ones continue from their last checkpoint, in the MLflow runs named by
    ``known_runs`` (trial id → run id; ``on_run_created`` hears each new one). A SIGINT or SIGTERM
    stops the sweep the way Tune saves it for a resume, then raises ``Interrupted``.
    ``warm_start``: an earlier sweep's finished trials, which seed an Optuna searcher
    (``on_notice`` hears what of them did not fit this sweep's space).
    """
    storage_path = Location.of(storage_path)
    candidates = candidates_of(config, model)
    check_search(config, candidates)
    check_objectives(config, feature_set.task, feature_set.num_outputs)
    space = tune_space(config, candidates)
    workers = config.workers_per_trial
    plan = plan_concurrency(
        config.concurrency,
        config.trials,
        cluster_cpus=float(ray.cluster_resources().get("CPU", 0)),
        cpus_per_worker=config.cpus_per_worker(train),
        workers_per_trial=workers,
    )
    refused = population_refusal(config.scheduler, config.trials, plan, config.concurrency)
    if refused is not None:
        raise UserError(refused)
    epochs = config.epochs or train.epochs
    # Each worker trains with the CPUs Tune reserves for it (its threads).
    scaling = {"workers": workers, "cpus_per_worker": config.cpus_per_worker(train)}
    trial_train = train.model_copy(
        update={"epochs": epochs, "scaling": train.scaling.model_copy(update=scaling)}
    )
    trial_job = TrainJob.for_feature_set(model, trial_train, feature_set)
    trainable: Any
    if workers == 1:
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                job=trial_job,
                candidates=candidates,
                train=feature_set.read("train"),
                valid=feature_set.read("valid"),
            ),
            {"cpu": config.cpus_per_trial},
        )
    else:
        # The trial only drives its Ray Train run; the run's workers hold the CPUs (counted by the plan).
        trainable = tune.with_resources(
            tune.with_parameters(
                _distributed_trial,
                job=trial_job,
                candidates=candidates,
                feature_set=feature_set,
                storage=(storage_path / "trials").uri,
                checkpoints_to_tune=config.scheduler == "pbt",
            ),
            {"cpu": 0.01},
        )
    rule = (
        HalvingRule.for_budget(epochs, min(config.grace_period, epochs), config.reduction_factor)
        if config.scheduler == "asha"
        else HalvingRule((), config.reduction_factor)
    )
    experiment_path = storage_path / run_name
    recorder = TrialRecorder(
        tracker,
        parent_run_id,
        epochs,
        on_event,
        known_runs,
        on_run_created,
        describe=lambda trial_config: _described(candidate_named(trial_config, candidates)),
        reaches_goal=config.reaches_goal,
    )
    # Through Ray Client, Tune's loop (and so its callbacks) runs on the cluster: trial events come
    # back over a queue to the recorder here, the one writer to MLflow.
    remote_loop = ray.util.client.ray.is_connected()
    run_config = tune.RunConfig(
        name=run_name,
        **ray_storage(storage_path),
        verbose=0,
        # Each trial's results in its folder (result.json), whatever loggers Tune is told to add:
        # the halving rule judges from them, on a resume too.
        callbacks=[SweepTracking(str(experiment_path), recorder), JsonLoggerCallback()],
        # PBT clones another trial from the checkpoint it reported, which must then outlive that
        # trial's next one: a sweep under PBT keeps every checkpoint.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if config.scheduler == "pbt" else 1),
        stop=_stopper(config, epochs),
        failure_config=tune.FailureConfig(max_failures=config.trial_retries),
    )
    try:
        where = ray_storage(experiment_path)
        restorable = {"path": where.pop("storage_path"), **where}
        if resume and tune.Tuner.can_restore(**restorable):
            tuner = tune.Tuner.restore(
                **restorable, trainable=trainable, resume_errored=True, param_space=space
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=config.metric,
                    mode=config.mode,
                    num_samples=1 if config.search == "grid" else config.trials,
                    # A generator (random search) holds the limit itself; Tune would ignore it here.
                    max_concurrent_trials=plan.concurrency if _optuna_searches(config, candidates) else None,
                    scheduler=scheduler(config, rule, epochs, candidates),
                    search_alg=searcher(config, candidates, warm_start, on_notice, plan.concurrency),
                    time_budget_s=config.time_budget_s,
                    # A trial's process is kept for the next one with the same resources: no
                    # second or more of start-up (imports of torch, scikit-learn) per trial. Not
                    # where PBT pauses a trial of several workers: ending its Ray Train run takes
                    # longer than Tune waits to reuse the process.
                    reuse_actors=not (config.scheduler == "pbt" and workers > 1),
                ),
                run_config=run_config,
            )
        relayed = _recorded_from(str(experiment_path), recorder) if remote_loop else nullcontext()
        began = time.monotonic()
        with _stop_gracefully_on_signals(here=not remote_loop), relayed, quiet_optuna():
            grid = tuner.fit()
        took = time.monotonic() - began
    finally:
        recorder.close_open_runs()
        release(str(experiment_path))
    results = [grid[i] for i in range(len(grid))]
    ends_early = config.scheduler not in ("asha", "fifo") and train.early_stopping is None
    trials = _summaries(results, rule, config, epochs, ends_early, recorder.ended_by_sweep)
    for trial in trials:  # the rule's verdict, which a live view may have seen late
        run_id = recorder.known_runs.get(trial.trial_id)
        if run_id and trial.status != "failed":
            tracker.set_tags(run_id, {"raylens.stopped_early": str(trial.status == "stopped").lower()})
    finished = [t for t in trials if t.status == "completed" and config.metric in t.metrics]
    if not finished:
        errors = sorted({error_line(str(r.error)) for r in results if r.error})
        raise UserError(nothing_finished(config, trials, errors, took))
    board = leaderboard_of(results, finished, candidates, trial_job, feature_set, config)
    _record_leaderboard(tracker, parent_run_id, board, recorder.known_runs)
    _record_trial_plots(tracker, parent_run_id, results, trials, candidates, config.metric)
    raise_without_winner(board)
    winner = board.winner
    assert winner is not None
    best = next(t for t in finished if t.trial_id == winner.trial_id)
    return SweepResult(winner.config, best.metrics, trials, plan, board)


class GoalReached(tune.Stopper):
    """Ends a sweep at the first result that meets tune.goal: that trial stops there, and so
    does every other (Tune stops the running ones and starts no more)."""

    def __init__(self, config: TuneConfig) -> None:
        self.config = config
        self.reached = False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        met = self.config.reaches_goal(result)
        self.reached = self.reached or met
        return met

    def stop_all(self) -> bool:
        return self.reached


def _stopper(config: TuneConfig, epochs: int) -> tune.Stopper | None:
    stoppers: list[tune.Stopper] = []
    if config.scheduler == "pbt":
        # A trial's last epoch ends it before PBT would pause it to perturb: nothing left to train.
        stoppers.append(MaximumIterationStopper(epochs))
    if config.goal is not None:
        stoppers.append(GoalReached(config))
    return CombinedStopper(*stoppers) if len(stoppers) > 1 else stoppers[0] if stoppers else None


def nothing_finished(config: TuneConfig, trials: list[TrialSummary], errors: list[str], took: float) -> str:
    """Why a sweep has no winner when no trial finished with the metric: a metric no trial
    reports, the trials' errors, or a time budget spent before the first trial finished."""
    known = sorted({k for t in trials for k in t.metrics})
    hint = "" if not known or config.metric in known else f"; tune.metric must be one of {', '.join(known)}"
    if config.time_budget_s is not None and took >= config.time_budget_s:
        hint += (
            f"; the time budget of {config.time_budget_s:g} s ran out before a trial finished:"
            " raise tune.time_budget_s"
        )
    said = "; ".join(errors)[:2000]
    return f"tune: no trial reported '{config.metric}'{hint}{'; errors: ' + said if said else ''}"


def leaderboard_of(
    results: list[Any],
    finished: list[TrialSummary],
    candidates: list[Candidate],
    job: TrainJob,
    feature_set: FeatureSet,
    config: TuneConfig,
) -> Leaderboard:
    """The completed trials ranked, each model's costs measured from its last checkpoint."""
    by_id = {str((r.metrics or {}).get("trial_id", "")): r for r in results}
    valid = feature_set.read("valid")
    rows: list[Row] = []
    best_of: dict[str, tuple[Row, Any, TrainJob]] = {}
    for trial in sorted(finished, key=lambda t: t.order):
        result = by_id[trial.trial_id]
        trial_job = job_of_trial(job, trial.config, candidates)
        family = family_of(trial_job.model)
        costs = Costs(
            train_seconds=float((result.metrics or {}).get("time_total_s", math.nan)),
            peak_rss_mb=_largest(result.path, result.filesystem, "train_rss_mb"),
        )
        predictor = None
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as folder:
                predictor = family.trial_predictor(trial_job, Path(folder))
            p50, p95 = latency_ms(predictor, valid.x)
            costs = replace(
                costs,
                predict_p50_ms=p50,
                predict_p95_ms=p95,
                model_mb=model_mb(family, predictor, trial_job.model),
            )
        candidate = candidate_named(trial.config, candidates).name
        reported = result.metrics or {}
        row = Row(
            trial.trial_id,
            candidate,
            trial.metrics[config.metric],
            costs,
            spec_values(trial.config, candidates),
            misses=misses(costs, config.constraints),
            objectives={
                o.metric: float(reported[o.metric])
                for o in config.objectives
                if isinstance(reported.get(o.metric), int | float)
            },
        )
        rows.append(row)
        kept = best_of.get(candidate)
        if predictor is not None and (
            kept is None or score(row.score, config.mode) > score(kept[0].score, config.mode)
        ):
            best_of[candidate] = (row, predictor, trial_job)
    order = {t.trial_id: t.order for t in finished}
    front = pareto_front(rows, config.mode)
    importances = {
        row.trial_id: permutation_importances(
            predictor,
            valid.x,
            valid.y,
            trial_job.task,
            config.metric,
            config.mode,
            feature_set.feature_columns,
        )
        for row, predictor, trial_job in best_of.values()
    }
    rows = [
        replace(row, pareto=row.trial_id in front, importances=importances.get(row.trial_id, []))
        for row in rows
    ]
    constraints = config.constraints.model_dump(exclude_none=True) if config.constraints else {}
    importance = parameter_importances(rows, candidates, config.mode, config.seed)
    objectives: dict[str, str] = {o.metric: o.mode for o in config.objectives}
    unreported = [name for name in objectives if not any(name in row.objectives for row in rows)]
    if unreported:
        known = sorted(
            {k for r in results for k, v in (r.metrics or {}).items() if isinstance(v, int | float)}
        )
        raise UserError(
            f"tune.objectives: no trial reported {', '.join(unreported)}; an objective is one of the "
            f"metrics trials report: {', '.join(k for k in known if k.startswith(('valid_', 'train_')))}, "
            "or time_total_s"
        )
    ranks = ranked(rows, config.mode, order)
    on_front = objectives_front(ranks, config.mode, objectives) if objectives else []
    return Leaderboard(config.metric, config.mode, ranks, constraints, objectives, on_front, importance)


def _described(candidate: Candidate) -> dict[str, str]:
    return {
        "raylens.candidate": candidate.name,
        "raylens.model_family": candidate.model.family,
        "raylens.model": candidate.model.name,
    }


def _record_trial_plots(
    tracker: Tracker,
    parent_run_id: str,
    results: list[Any],
    trials: list[TrialSummary],
    candidates: list[Candidate],
    metric: str,
) -> None:
    """The sweep run's pictures of its trials: every trial's learning curve, and the values of
    the finished ones against the metric (parallel coordinates, numeric values only)."""
    curves = {}
    for trial, result in zip(trials, results, strict=True):
        reported = reported_results(result.path, result.filesystem)
        curves[f"{candidate_named(trial.config, candidates).name} {trial.trial_id}"] = [
            (float(r.get("epoch", r.get("training_iteration", 0))), float(r[metric]))
            for r in reported
            if isinstance(r.get(metric), int | float)
        ]
    tracker.log_figure(parent_run_id, trials_figure(curves, metric), "plots/trials_learning_curves.png")
    finished = [t for t in trials if t.status != "failed" and metric in t.metrics]
    rows = []
    for trial in finished:
        values = spec_values(trial.config, candidates)
        numeric = {
            k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        rows.append({**numeric, metric: trial.metrics[metric]})
    axes = sorted({key for row in rows for key in row if key != metric})
    if rows and axes:
        tracker.log_figure(
            parent_run_id, parallel_coordinates_figure(rows, axes, metric), "plots/parallel_coordinates.png"
        )


def _largest(path: str, filesystem: Any, key: str) -> float | None:
    """The largest value of ``key`` a trial reported (from its result.json)."""
    values = [
        float(r[key]) for r in reported_results(path, filesystem) if isinstance(r.get(key), int | float)
    ]
    return max(values) if values else None


def _record_leaderboard(
    tracker: Tracker, parent_run_id: str, board: Leaderboard, known_runs: Mapping[str, str]
) -> None:
    """The leaderboard as the sweep run's table and Pareto plot; the winner's run tagged."""
    tracker.log_dict(parent_run_id, board.to_dict(), LEADERBOARD)
    points = [
        (row.candidate, row.costs.predict_p95_ms, row.score, row.pareto)
        for row in board.rows
        if row.costs.predict_p95_ms is not None
    ]
    if points:
        tracker.log_figure(
            parent_run_id,
            pareto_figure(points, board.metric, "trials: metric against prediction latency"),
            "plots/pareto_front.png",
        )
    if board.objectives:
        first = next(iter(board.objectives))
        on_front = set(board.front)
        tracker.log_figure(
            parent_run_id,
            pareto_figure(
                [
                    (row.candidate, row.objectives[first], row.score, row.trial_id in on_front)
                    for row in board.rows
                    if first in row.objectives
                ],
                board.metric,
                f"trials: {board.metric} against {first}",
                xlabel=first,
                log_x=False,
            ),
            "plots/objectives_front.png",
        )
    if board.parameter_importances:
        tracker.log_figure(
            parent_run_id,
            importance_figure(board.parameter_importances, board.metric),
            "plots/parameter_importance.png",
        )
    winner = board.winner
    if winner is not None and winner.trial_id in known_runs:
        tracker.set_tags(known_runs[winner.trial_id], {"raylens.best_trial": "true"})


def _optuna_searches(config: TuneConfig, candidates: list[Candidate]) -> bool:
    """TPE, and any search across candidates (a conditional space), run through Optuna."""
    return config.search == "tpe" or len(candidates) > 1


def tune_space(config: TuneConfig, candidates: list[Candidate]) -> dict[str, Any]:
    """The space as Tune's sampling domains, keyed by dotted spec path: random draws, or grid
    values; none where Optuna holds the space (``define_by_run``)."""
    if _optuna_searches(config, candidates):
        return {}
    (only,) = candidates
    if config.search == "grid":
        return {path: tune.grid_search(list(dist.args[0])) for path, dist in only.space.items()}
    return {path: dist.to_tune() for path, dist in only.space.items()}


def searcher(
    config: TuneConfig,
    candidates: list[Candidate],
    earlier: list[EarlierTrial] | None = None,
    on_notice: Callable[[str], None] = lambda text: None,
    max_concurrent: int = 0,
) -> Any:
    """The sweep's seeded search: the same seed draws the same configurations, in order (TPE: in
    the order results arrive). Random search of one model is Tune's own; TPE, and random search
    across candidates, are Optuna's samplers through Ray Tune's OptunaSearch; ``earlier``
    trials (a warm start) are finished trials of its study before the first is drawn.
    ``max_concurrent`` trials at most run at once (0: no limit)."""
    if not _optuna_searches(config, candidates):
        # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: it holds its own.
        return BasicVariantGenerator(random_state=config.seed, max_concurrent=max_concurrent)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = (
        optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=tpe_startup_trials(config.trials))
        if config.search == "tpe"
        else optuna.samplers.RandomSampler(seed=config.seed)
    )
    with quiet_optuna():  # its study's creation is logged at INFO
        warm: dict[str, Any] = {}
        if earlier:
            storage, notes = seeded_study(earlier, candidates, config.mode)
            warm = {"storage": storage, "study_name": WARM_STUDY}
            for note in notes:
                on_notice(note)
        metric: str | list[str] = config.metric
        mode: str | list[str] = config.mode
        if config.objectives:  # multi-objective: Optuna's TPE models every objective's values
            metric = [config.metric, *(o.metric for o in config.objectives)]
            mode = [config.mode, *(o.mode for o in config.objectives)]
        return OptunaSearch(space=DefineByRun(candidates), sampler=sampler, metric=metric, mode=mode, **warm)


def tpe_startup_trials(trials: int) -> int:
    """Random trials TPE starts with before it models the space: Optuna's 10, or a quarter of a
    smaller budget (at least 2), so a sweep of a dozen trials is not random search throughout."""
    return max(2, min(10, trials // 4))


def scheduler(config: TuneConfig, rule: HalvingRule, epochs: int, candidates: list[Candidate]) -> Any:
    """The trial scheduler ``tune.scheduler`` names, counting time in epochs (reports)."""
    if config.scheduler == "asha":
        return OrderedHalvingScheduler(rule, config.metric, config.mode)
    if config.scheduler == "hyperband":
        return HyperBandScheduler(
            time_attr="training_iteration", max_t=epochs, reduction_factor=config.reduction_factor
        )
    if config.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=config.grace_period,
            hyperparam_mutations={path: dist.to_tune() for path, dist in candidates[0].space.items()},
            quantile_fraction=0.25,
            synch=True,  # every trial judged at the same epochs, whatever the arrival order
        )
    if config.scheduler == "median":
        return MedianStoppingRule(
            time_attr="training_iteration", grace_period=config.grace_period, min_samples_required=3
        )
    return FIFOScheduler()


def _summaries(
    results: list[Any],
    rule: HalvingRule,
    config: TuneConfig,
    epochs: int,
    ends_early: bool,
    ended_by_sweep: Collection[str] = (),
) -> list[TrialSummary]:
    """Each trial's outcome, judged again by ``rule`` over its whole history once every trial
    has ended: a trial the rule stops is ``stopped`` even if its stop arrived after its last
    epoch, so the outcome never depends on the order results arrived. Where the scheduler
    ``ends_early`` (one of Ray Tune's, no early stopping of its own), a trial that ended before
    ``epochs`` was stopped by the scheduler. Trials the sweep's end stopped (``ended_by_sweep``:
    a goal met, a time budget spent) are stopped where they stood, and so is one without an error
    that never reported (ended before its first epoch); a trial that met tune.goal is
    ``completed`` where it ended."""
    metric, mode = config.metric, config.mode
    ids = [str((r.metrics or {}).get("trial_id", "")) for r in results]
    numbers = {  # the grid lists trials in the order they were created: the fallback
        trial_id: trial_number(trial_id, str((result.metrics or {}).get("experiment_tag", "")), index + 1)
        for index, (trial_id, result) in enumerate(zip(ids, results, strict=True))
        if trial_id
    }
    scores: dict[int, dict[int, float]] = {}
    for trial_id, result in zip(ids, results, strict=True):
        if trial_id:
            scores[numbers[trial_id]] = {
                int(reported["training_iteration"]): score(float(reported[metric]), mode)
                for reported in reported_results(result.path, result.filesystem)
                if isinstance(reported.get(metric), int | float) and "training_iteration" in reported
            }
    decisions = rule.decide(scores, set(numbers.values()))
    summaries = []
    for trial_id, result in zip(ids, results, strict=True):
        decision = decisions.get(numbers[trial_id]) if trial_id else None
        stopped_at = decision.stopped_at if decision else None
        last = int((result.metrics or {}).get("training_iteration", 0))
        cut = last == 0 or trial_id in ended_by_sweep
        if not result.error and last < epochs and (cut or ends_early):
            stopped_at = last
        if config.reaches_goal(result.metrics or {}):
            stopped_at = None
        by_rule = bool(result.error) and stopped_by_rule(str(result.error)) is not None
        if by_rule:
            stopped_at = last  # a debugger rule stopped it: the sweep goes on without it
        failed = bool(result.error) and not by_rule
        status = "failed" if failed else "stopped" if stopped_at is not None else "completed"
        summaries.append(
            TrialSummary(
                trial_id,
                dict(result.config or {}),
                trial_metrics(result.metrics or {}),
                status,
                stopped_at,
                numbers.get(trial_id, 0),
            )
        )
    return summaries


@contextmanager
def _recorded_from(sweep_path: str, recorder: TrialRecorder) -> Iterator[None]:
    """The sweep's named queue (``relay_name``) beside this driver; while ``fit`` blocks this
    thread, another records the trial events it brings, and the rest once ``fit`` returns. A
    failure to record is raised here, not lost in the thread."""
    relay = Queue(actor_options={**beside_the_driver(), "name": relay_name(sweep_path)})
    done = threading.Event()
    errors: list[Exception] = []

    def record_arrivals() -> None:
        while not done.is_set():
            try:
                note = relay.get(timeout=0.5)
            except Empty:
                continue
            except Exception as exc:  # the queue's actor is gone: raised below
                errors.append(exc)
                return
            try:
                recorder.record(note)
            except Exception as exc:  # MLflow refused the write: raised below
                errors.append(exc)
                return

    thread = threading.Thread(target=record_arrivals, name="raylens-trial-events", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        try:
            while not errors:
                recorder.record(relay.get_nowait())
        except Empty:
            pass
        except Exception as exc:
            errors.append(exc)
        finally:
            with suppress(Exception):  # gone with its node: nothing left to stop
                relay.shutdown()
    if errors:
        raise errors[0]


@contextmanager
def _stop_gracefully_on_signals(here: bool = True) -> Iterator[None]:
    """Turn SIGINT and SIGTERM during ``Tuner.fit`` into Tune's own graceful stop, then raise.

    On SIGINT Tune's handler stops the loop, saves the sweep (running trials stay resumable)
    and ``fit`` returns as if the sweep had finished; it then puts the SIGINT handler it found
    back, which is how the stop is recognised here. Tune leaves SIGTERM alone: it is forwarded
    to Tune's SIGUSR1 handler, the same graceful stop. Tune's handlers are removed afterwards
    (it leaves them installed), so a later Ctrl-C is not swallowed.

    Unless Tune's loop runs ``here``: through Ray Client it runs on the cluster, and a signal stops
    this driver as any other step does (a resume goes on from the state Tune saved last).
    """
    if (
        not here
        or threading.current_thread() is not threading.main_thread()
        or os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") not in ("", "0")
    ):
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    caught: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        caught.append(signum)
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if callable(tune_stop) and tune_stop is not before[signal.SIGUSR1]:
            tune_stop(signal.SIGUSR1, frame)
        else:  # Tune is not running its loop yet (or any more): stop right here
            raise Interrupted(signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
        if not caught and signal.getsignal(signal.SIGINT) is before[signal.SIGINT]:
            caught.append(signal.SIGINT)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if caught:
        raise Interrupted(caught[0])
