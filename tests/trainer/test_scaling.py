"""The spec's train.scaling reaches Ray Train as written (no Ray started: the config value only)."""

import pytest

from raylens.features import FeatureSet
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob
from raylens.trainer.config import PipelineConfig
from raylens.trainer.parallel import ParallelPlan
from raylens.trainer.ray_train import scaling_config


def test_workers_cpus_and_gpus_per_worker_reach_ray_train(iris: FeatureSet) -> None:
    train = TrainConfig(scaling={"workers": 3, "cpus_per_worker": 1.5, "use_gpu": True})
    config = scaling_config(TrainJob.for_feature_set(TorchModelConfig(), train, iris))
    assert (config.num_workers, config.use_gpu) == (3, True)
    assert config.resources_per_worker == {"CPU": 1.5}


def test_the_plan_says_what_it_chose_and_why() -> None:
    auto = ParallelPlan.from_config("auto", 2)
    assert auto.strategy == "ddp" and auto.reason.startswith("auto → ddp: 2 replicas")
    assert ParallelPlan.from_config("fsdp", 4).strategy == "fsdp"
    single = ParallelPlan.from_config("ddp", 1)
    assert single.strategy == "none" and "no parallel wrapper" in single.reason
    assert ParallelPlan.from_config("fsdp", 1).strategy == "none"
    pipeline = ParallelPlan.from_config(
        "pipeline", 2, pipeline=PipelineConfig(schedule="gpipe", microbatches=8)
    )
    assert pipeline.strategy == "pipeline" and pipeline.pipeline is not None
    assert "2 stages, one per worker; gpipe schedule, 8 microbatches" in pipeline.reason
    for requested, workers, message in (
        ("tensor", 2, "not one of"),
        ("ddp", 0, "at least one"),
    ):
        with pytest.raises(ValueError, match=message):
            ParallelPlan.from_config(requested, workers)


def test_an_elastic_range_reaches_ray_train_and_is_checked(iris: FeatureSet) -> None:
    elastic = TrainConfig(scaling={"workers": [2, 4]})
    assert scaling_config(TrainJob.for_feature_set(TorchModelConfig(), elastic, iris)).num_workers == (2, 4)
    assert (elastic.scaling.min_workers, elastic.scaling.max_workers) == (2, 4)
    assert elastic.scaling.shown_workers == "2-4 (elastic)"
    assert TrainConfig(scaling={"workers": [3, 3]}).scaling.workers == 3
    for bad, message in (([4, 2], "is not a range of workers"), ([1, 2, 3], "or \\[min, max\\]")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(scaling={"workers": bad})
    with pytest.raises(ValueError, match="fsdp shards the model"):
        TrainConfig(scaling={"workers": [1, 4], "strategy": "fsdp"})


def test_auto_replicates_a_model_that_fits_and_shards_one_that_does_not() -> None:
    small = ParallelPlan.from_config("auto", 2, parameters=100_000, worker_memory=8 << 30)
    assert small.strategy == "ddp"
    assert "training state 1.5 MiB per replica, 8.0 GiB per worker: replicas fit" in small.reason
    # 1e9 parameters hold 16 GB of training state: more than half of a 24 GiB worker.
    large = ParallelPlan.from_config("auto", 2, parameters=1_000_000_000, worker_memory=24 << 30)
    assert large.strategy == "fsdp" and large.reason.startswith("auto → fsdp: a replica would not fit")
    assert ParallelPlan.from_config("ddp", 2, parameters=10**12, worker_memory=1).strategy == "ddp"  # asked
