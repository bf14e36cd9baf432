"""What raylens asks of Ray: the settings value handed to ray.init (no Ray started here)."""

import os

from raylens.cluster.runtime import RuntimeSettings, embedded_cpus


def test_workers_get_the_fast_report_poll_and_nothing_else_is_tuned() -> None:
    env = RuntimeSettings.build().worker_env
    # Ray Train's default 2 s poll adds up to 2 s to every epoch (BENCHMARKS.md).
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
    assert "OMP_WAIT_POLICY" not in env  # measured no better (BENCHMARKS.md, thread)


def test_embedded_ray_gets_more_logical_cpus_than_the_machine_has_cores() -> None:
    assert embedded_cpus() > (os.cpu_count() or 1)
    assert embedded_cpus() >= 4
