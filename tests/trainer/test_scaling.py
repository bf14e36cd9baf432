"""The spec's train.scaling reaches Ray Train as written (no Ray started: the config value only)."""

from raylens.features import FeatureSet
from raylens.trainer import ModelConfig, TrainConfig, TrainJob
from raylens.trainer.parallel import resolve_strategy
from raylens.trainer.ray_train import scaling_config


def test_workers_cpus_and_gpus_per_worker_reach_ray_train(iris: FeatureSet) -> None:
    train = TrainConfig(scaling={"workers": 3, "cpus_per_worker": 1.5, "use_gpu": True})
    config = scaling_config(TrainJob.for_feature_set(ModelConfig(), train, iris))
    assert (config.num_workers, config.use_gpu) == (3, True)
    assert config.resources_per_worker == {"CPU": 1.5}


def test_auto_is_ddp_and_one_worker_needs_no_strategy() -> None:
    assert resolve_strategy("auto", 2) == "ddp"
    assert resolve_strategy("fsdp", 2) == "fsdp"
    assert resolve_strategy("fsdp", 1) == resolve_strategy("ddp", 1) == "none"
