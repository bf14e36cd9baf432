"""Models, the plain PyTorch training loop, parallel strategies, the Ray Train bridge, tracking.

Importing this package imports nothing heavy: each export is imported on first use, so the
configs can be read without torch. The loop, models and metrics are plain PyTorch; the Ray Train
bridge is ``raylens.trainer.ray_train``; a tracked run is ``raylens.trainer.run``.
"""

from typing import TYPE_CHECKING

from raylens.lazy import lazy_exports

if TYPE_CHECKING:
    from raylens.trainer.config import (
        AnyModelConfig,
        ModelConfig,
        OptimizerConfig,
        ScalingConfig,
        SklearnModelConfig,
        TorchModelConfig,
        TrainConfig,
        parse_model_config,
    )
    from raylens.trainer.family import TrainJob
    from raylens.trainer.job import run_worker, shard_rows
    from raylens.trainer.loop import Batches, Reporter, TrainState, evaluate, fit, predict
    from raylens.trainer.models import build_model, check_model_runs, check_params, importable_from
    from raylens.trainer.task import TaskSpec, task_spec

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "raylens.trainer.config": [
            "AnyModelConfig",
            "ModelConfig",
            "OptimizerConfig",
            "ScalingConfig",
            "SklearnModelConfig",
            "TorchModelConfig",
            "TrainConfig",
            "parse_model_config",
        ],
        "raylens.trainer.family": ["TrainJob"],
        "raylens.trainer.job": ["run_worker", "shard_rows"],
        "raylens.trainer.loop": [
            "Batches",
            "Reporter",
            "TrainState",
            "evaluate",
            "fit",
            "predict",
        ],
        "raylens.trainer.models": ["build_model", "check_model_runs", "check_params", "importable_from"],
        "raylens.trainer.task": ["TaskSpec", "task_spec"],
    },
)
