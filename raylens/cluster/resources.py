"""Whether a run's workers can ever fit the cluster: asked vs available, said in seconds.

Ray would otherwise wait for resources that never come (a 16-worker run on a 4-CPU embedded
cluster waits forever). On the embedded cluster that is a mistake in the spec; on a cluster given
by ``--address`` it may be an autoscaler's to fix, so it is only said.
"""

from __future__ import annotations

from raylens.trainer import TrainConfig
from raylens.tuning import TuneConfig
from raylens.tuning.plan import headroom_cpus, plan_concurrency, population_refusal


def resource_shortfall(
    train: TrainConfig, tune: TuneConfig | None, *, cpus: float, gpus: float, trains: bool
) -> str | None:
    """What the run asks beyond ``cpus`` and ``gpus`` (the cluster's totals), or None when it
    fits: the final training's workers (when ``trains``), and one trial of the sweep."""
    scaling = train.scaling
    problems = []
    if trains:
        # An elastic run needs its minimum: the cluster can then always give it that.
        asked = scaling.min_workers * scaling.cpus_per_worker
        if asked > cpus + 1e-9:
            problems.append(
                f"train.scaling asks for {_count(asked, 'CPU')} ({_count(scaling.min_workers, 'worker')} "
                f"x {scaling.cpus_per_worker:g} cpus_per_worker) and the cluster has {cpus:g}"
            )
        if scaling.use_gpu and scaling.min_workers > gpus:
            problems.append(
                f"train.scaling.use_gpu asks for {_count(scaling.min_workers, 'GPU')} (one per worker) "
                f"and the cluster has {gpus:g}"
            )
    if tune is not None:
        workers = tune.workers_per_trial
        per_worker = tune.cpus_per_worker(train)
        per_trial, headroom = workers * per_worker, headroom_cpus(workers)
        if per_trial > cpus - headroom + 1e-9:
            kept = f", {headroom:g} of them kept free beside the trials" if headroom else ""
            problems.append(
                f"one trial of the sweep asks for {per_trial:g} CPUs and the cluster has {cpus:g}{kept}"
            )
        else:
            plan = plan_concurrency(
                tune.concurrency,
                tune.trials,
                cluster_cpus=cpus,
                cpus_per_worker=per_worker,
                workers_per_trial=workers,
            )
            refused = population_refusal(tune.scheduler, tune.trials, plan, tune.concurrency)
            if refused is not None:
                problems.append(refused)
    return "; ".join(problems) if problems else None


def _count(number: float, noun: str) -> str:
    return f"{number:g} {noun}" + ("" if number == 1 else "s")
