import pytest

from raylens.errors import UserError
from raylens.tuning import plan_concurrency


def test_concurrency_is_capped_by_what_fits() -> None:
    plan = plan_concurrency(8, trials=20, cluster_cpus=4, cpus_per_worker=1, workers_per_trial=1)
    assert plan.concurrency == 4 and "lowered from 8" in plan.reason
    # Trials of several workers keep a CPU free for their Ray Train runs' drivers and Ray Data.
    plan = plan_concurrency(8, trials=20, cluster_cpus=5, cpus_per_worker=1, workers_per_trial=2)
    assert plan.concurrency == 2


def test_requested_concurrency_is_kept_when_it_fits() -> None:
    plan = plan_concurrency(2, trials=6, cluster_cpus=4, cpus_per_worker=1, workers_per_trial=1)
    assert (plan.concurrency, plan.reason) == (2, "as requested")


def test_never_more_than_the_trials() -> None:
    assert (
        plan_concurrency(4, trials=2, cluster_cpus=16, cpus_per_worker=1, workers_per_trial=1).concurrency
        == 2
    )


def test_multi_worker_trials_count_all_their_workers() -> None:
    plan = plan_concurrency(4, trials=8, cluster_cpus=8, cpus_per_worker=1, workers_per_trial=2)
    assert plan.concurrency == 3 and plan.cpus_per_trial == 2


def test_a_trial_that_cannot_fit_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="one trial needs 4 CPUs"):
        plan_concurrency(1, trials=1, cluster_cpus=4, cpus_per_worker=2, workers_per_trial=2)
