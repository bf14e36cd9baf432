"""The Ray runtime: start an embedded local cluster, or connect to one, quietly.

Embedded Ray gets more logical CPUs than the machine has cores, so Ray Data tasks and the
drivers of Ray Train runs always find a CPU beside the training workers (a 2-CPU local cluster
running 2 training workers can hang with the machine idle).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MIN_EMBEDDED_CPUS = 4
TRAIN_POLL_INTERVAL_S = "0.2"
"""Ray Train's controller collects each worker's report on this poll; a report blocks until it
is collected, so the default (2 s) adds up to 2 s to every epoch. Ray propagates the variable
from the driver to the controller and workers."""


@dataclass(frozen=True)
class RayRuntime:
    """What ``start_ray`` did: whether this process started Ray (and so must stop it)."""

    started_here: bool
    cpus: float
    address: str | None


def quiet_logs(verbose: bool) -> None:
    """Ray, MLflow and friends print a lot at INFO; users see it only with --verbose."""
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.train", "ray.tune", "ray.data", "mlflow", "alembic", "py.warnings", "raylens"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def embedded_cpus() -> int:
    return max(MIN_EMBEDDED_CPUS, 2 * (os.cpu_count() or 1))


def start_ray(
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    verbose: bool = False,
    code_dirs: Sequence[Path] = (),
) -> RayRuntime:
    """Connect to ``address`` or start an embedded cluster; reuse one already connected."""
    import ray

    quiet_logs(verbose)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
    if ray.is_initialized():
        return RayRuntime(False, float(ray.cluster_resources().get("CPU", 0)), address)
    # Workers import user model factories from the spec's folder, as the driver does.
    paths = [str(p.resolve()) for p in code_dirs]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}} if paths else None
    logging_level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging_level, log_to_driver=verbose)
    else:
        ray.init(
            num_cpus=num_cpus or embedded_cpus(),
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging_level,
            log_to_driver=verbose,
        )
    return RayRuntime(True, float(ray.cluster_resources().get("CPU", 0)), address)


def stop_ray(runtime: RayRuntime) -> None:
    import ray

    if runtime.started_here and ray.is_initialized():
        ray.shutdown()
