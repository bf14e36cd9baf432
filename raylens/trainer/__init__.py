"""Models, the plain PyTorch training loop, parallel strategies, the Ray Train bridge, tracking.

Importing this package does not import Ray: the loop, models and metrics are plain PyTorch.
The Ray Train bridge is ``raylens.trainer.ray_train``; a tracked run is ``raylens.trainer.run``.
"""

from raylens.trainer.config import ModelConfig, OptimizerConfig, ScalingConfig, TrainConfig
from raylens.trainer.job import TrainJob, run_worker, shard_rows, task_spec
from raylens.trainer.loop import Batches, Reporter, TaskSpec, TrainState, evaluate, fit, predict
from raylens.trainer.models import build_model, check_model_runs, check_params, importable_from

__all__ = [
    "Batches",
    "ModelConfig",
    "OptimizerConfig",
    "Reporter",
    "ScalingConfig",
    "TaskSpec",
    "TrainConfig",
    "TrainJob",
    "TrainState",
    "build_model",
    "check_model_runs",
    "check_params",
    "evaluate",
    "fit",
    "importable_from",
    "predict",
    "run_worker",
    "shard_rows",
    "task_spec",
]
