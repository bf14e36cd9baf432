"""The composition root: the CLI, the experiment spec, the Ray runtime, the run folder.

``Experiment`` is imported lazily so that ``raylens --help`` does not pay for Ray and MLflow.
"""

from typing import Any

__all__ = ["Experiment"]


def __getattr__(name: str) -> Any:
    if name == "Experiment":
        from raylens.cluster.experiment import Experiment

        return Experiment
    raise AttributeError(name)
