"""raylens: train, tune, debug and ship PyTorch models on a Ray cluster from one experiment spec.

Packages, imports pointing down only::

    raylens.cluster   composition root: CLI, experiment spec, Ray runtime
    raylens.tuning    search spaces, schedulers, sweeps tracked as one tree
    raylens.trainer   models, plain PyTorch loop, parallel strategies, Ray Train bridge, tracking
    raylens.features  sources, validation, splits, transforms, versioned offline store

This module stays import-light: ``import raylens`` must not start Ray or load MLflow.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["Experiment", "__version__"]


def __getattr__(name: str) -> Any:
    # ``raylens.Experiment`` without importing Ray and MLflow on ``import raylens``.
    if name == "Experiment":
        from raylens.cluster.experiment import Experiment

        return Experiment
    raise AttributeError(name)
