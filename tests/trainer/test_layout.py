"""``auto`` on one machine: several CPU workers train as one process with all their CPUs while a
replica fits (no Ray needed to decide it)."""

from __future__ import annotations

from raylens.features import FeatureSet
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob
from raylens.trainer.parallel.plan import one_process_reason
from raylens.trainer.torch_family import node_layout


def test_auto_trains_small_models_in_one_process_on_one_machine(iris: FeatureSet) -> None:
    asked = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [8]}),
        TrainConfig(scaling={"workers": 2, "cpus_per_worker": 1.5}),
        iris,
    )
    job, plan = node_layout(asked, embedded=True)
    assert (job.train.scaling.workers, job.train.scaling.cpus_per_worker) == (1, 3.0)
    assert plan.strategy == "none" and plan.reason.startswith("auto → 1 worker with 3 CPUs instead of 2")
    # A cluster's workers are on other machines; ddp and fsdp are as asked; so is an elastic range.
    for other, embedded in (
        (asked, False),
        (
            TrainJob.for_feature_set(
                asked.model, TrainConfig(scaling={"workers": 2, "strategy": "ddp"}), iris
            ),
            True,
        ),
        (TrainJob.for_feature_set(asked.model, TrainConfig(scaling={"workers": [2, 3]}), iris), True),
    ):
        kept, plan = node_layout(other, embedded=embedded)
        assert kept == other and plan.strategy == "ddp"


def test_a_model_whose_replica_does_not_fit_stays_sharded_over_the_workers() -> None:
    assert one_process_reason(2, 2.0, parameters=10**6, memory=8 << 30) is not None
    assert one_process_reason(2, 2.0, parameters=10**9, memory=24 << 30) is None  # 16 GB of state
    assert one_process_reason(1, 2.0, parameters=10, memory=8 << 30) is None
