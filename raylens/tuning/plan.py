"""How many trials can run at once on this cluster: a decision returned as a value."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raylens.errors import UserError


@dataclass(frozen=True)
class ConcurrencyPlan:
    concurrency: int
    cpus_per_trial: float
    reason: str


def plan_concurrency(
    requested: int,
    trials: int,
    cluster_cpus: float,
    cpus_per_worker: float,
    workers_per_trial: int,
) -> ConcurrencyPlan:
    """Cap concurrency so every running trial's workers fit beside the sweep's headroom
    (``headroom_cpus``)."""
    reserved_cpus = headroom_cpus(workers_per_trial)
    per_trial = cpus_per_worker * workers_per_trial
    usable = max(cluster_cpus - reserved_cpus, 0.0)
    fits = math.floor(usable / per_trial + 1e-9)
    if fits < 1:
        kept = f" with {reserved_cpus:g} kept free" if reserved_cpus else ""
        raise UserError(
            f"tune: one trial needs {per_trial:g} CPUs ({workers_per_trial} workers x {cpus_per_worker:g}), "
            f"but the cluster has {cluster_cpus:g}{kept}; "
            "lower tune.workers_per_trial or tune.cpus_per_trial, or add nodes"
        )
    concurrency = min(requested, trials, fits)
    if concurrency < requested:
        reason = f"lowered from {requested}: {fits} trials of {per_trial:g} CPUs fit in {cluster_cpus:g} CPUs"
        if trials < requested and trials <= fits:
            reason = f"lowered from {requested} to the number of trials"
    else:
        reason = "as requested"
    return ConcurrencyPlan(concurrency, per_trial, reason)


def headroom_cpus(workers_per_trial: int) -> float:
    """CPUs a sweep keeps free beside its trials: one where trials are Ray Train runs of several
    workers (their drivers and Ray Data must stay schedulable), none for one-worker trials."""
    return 1.0 if workers_per_trial > 1 else 0.0


def population_refusal(scheduler: str, trials: int, plan: ConcurrencyPlan, requested: int) -> str | None:
    """Why PBT cannot run this sweep, or None: it pauses each trial at every perturbation until the
    whole population got there, so a trial that cannot start would leave it waiting forever."""
    if scheduler != "pbt" or plan.concurrency >= trials:
        return None
    return (
        f"tune.scheduler: pbt trains its whole population (tune.trials: {trials}) at once, but "
        f"{plan.concurrency} run at a time (tune.concurrency {requested}: {plan.reason}): lower "
        f"tune.trials to {plan.concurrency}, or give the sweep more CPUs"
    )
