"""A run that asks more of the cluster than it has is refused before anything starts (embedded)
or said (a cluster that may autoscale). No Ray: the cluster's totals are given."""

from raylens.cluster.resources import resource_shortfall
from raylens.trainer import TrainConfig
from raylens.tuning import TuneConfig

SPACE = {"train.optimizer.lr": "uniform(0.01, 0.1)"}


def test_the_final_training_and_a_trial_are_measured_against_the_cluster() -> None:
    fits = TrainConfig(scaling={"workers": 2, "cpus_per_worker": 2})
    assert resource_shortfall(fits, None, cpus=4, gpus=0, trains=True) is None
    too_many = TrainConfig(scaling={"workers": 16})
    message = resource_shortfall(too_many, None, cpus=4, gpus=0, trains=True)
    assert message == "train.scaling asks for 16 CPUs (16 workers x 1 cpus_per_worker) and the cluster has 4"
    one = resource_shortfall(TrainConfig(), None, cpus=0, gpus=0, trains=True)
    assert one == "train.scaling asks for 1 CPU (1 worker x 1 cpus_per_worker) and the cluster has 0"
    assert resource_shortfall(too_many, None, cpus=4, gpus=0, trains=False) is None  # `tune` trains nothing
    gpus = TrainConfig(scaling={"workers": 2, "use_gpu": True})
    assert "asks for 2 GPUs (one per worker) and the cluster has 0" in str(
        resource_shortfall(gpus, None, cpus=8, gpus=0, trains=True)
    )
    wide_trials = TuneConfig(space=SPACE, workers_per_trial=4)
    message = resource_shortfall(TrainConfig(), wide_trials, cpus=4, gpus=0, trains=True)
    assert message is not None and "one trial of the sweep asks for 4 CPUs and the cluster has 4" in message
    # A one-worker trial may take every CPU; a population PBT cannot run at once is refused.
    assert (
        resource_shortfall(
            TrainConfig(), TuneConfig(space=SPACE, cpus_per_trial=4), cpus=4, gpus=0, trains=False
        )
        is None
    )
    pbt = TuneConfig(space=SPACE, scheduler="pbt", trials=6, concurrency=6)
    message = resource_shortfall(TrainConfig(), pbt, cpus=4, gpus=0, trains=False)
    assert (
        message is not None
        and "pbt trains its whole population (tune.trials: 6) at once, but 4 run" in message
    )


def test_an_elastic_run_needs_room_for_its_minimum() -> None:
    assert (
        resource_shortfall(TrainConfig(scaling={"workers": [2, 64]}), None, cpus=4, gpus=0, trains=True)
        is None
    )
    message = resource_shortfall(TrainConfig(scaling={"workers": [8, 64]}), None, cpus=4, gpus=0, trains=True)
    assert message is not None and "asks for 8 CPUs (8 workers x 1" in message
