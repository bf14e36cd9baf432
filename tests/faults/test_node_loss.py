"""A node lost mid-run on a two-node Ray cluster (``ray.cluster_utils.Cluster``): an elastic run
(``workers: [1, 2]``) that had a worker on each node goes on, on the node that is left, from its
last checkpoint — every epoch heard once, in order. (The run's queue to the driver lives on the
driver's node: placed on the lost one, it took the run with it.)

The cluster runs in a subprocess (this module run as a script): the test session's own Ray
cluster stays as it is. It runs with the in-process tests, one at a time, not beside the
end-to-end tests' background run: two nodes' start-up and a node's death take CPU.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tests.servers import run_as_script

EPOCHS = 5
LOSE_AFTER_EPOCH = 2


def _lose_a_node_mid_run(folder: Path) -> dict[str, object]:
    import ray
    from ray.cluster_utils import Cluster

    from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob
    from raylens.trainer.parallel import load_checkpoint
    from raylens.trainer.ray_train import checkpoint_folders, train_distributed
    from tests.conftest import iris_feature_set

    # Before going on with fewer workers, Ray Train waits for the lost ones' resources for
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default; time for an autoscaler to replace
    # the node). The nodes started here, and the Train controller on them, inherit this.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        iris = iris_feature_set(folder / "features")
        job = TrainJob.for_feature_set(
            TorchModelConfig(
                name="tests.faults.slow_models:build", params={"hidden": [16], "step_seconds": 0.2}
            ),
            TrainConfig(
                epochs=EPOCHS,
                batch_size=8,
                scaling={"workers": [1, 2], "strategy": "ddp"},
                checkpoints_to_keep=EPOCHS + 2,
                max_failures=2,
            ),
            iris,
        )
        heard: list[float] = []
        nodes_at_start = len([n for n in ray.nodes() if n["Alive"]])

        def lose_the_node(metrics: dict[str, float]) -> None:
            heard.append(metrics["epoch"])
            if metrics["epoch"] == LOSE_AFTER_EPOCH:
                _wait_until_ray_registered_a_checkpoint(folder / "ray" / "node-loss")
                cluster.remove_node(node)

        outcome = train_distributed(
            job, iris, run_name="node-loss", storage_path=folder / "ray", on_epoch=lose_the_node
        )
        checkpoints = [load_checkpoint(f) for f in checkpoint_folders(Path(outcome.run_path))]
        return {
            "nodes_at_start": nodes_at_start,
            "nodes_at_end": len([n for n in ray.nodes() if n["Alive"]]),
            "heard": heard,
            "history": [m["epoch"] for m in outcome.history],
            "checkpoints": [(c["epoch"], len(c["rng"])) for c in checkpoints],
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def _wait_until_ray_registered_a_checkpoint(run_folder: Path, timeout_s: float = 60) -> None:
    """The driver hears an epoch as soon as a worker reports it; Ray's controller registers the
    epoch's checkpoint when it next polls the workers, later on a loaded machine. Only a
    registered checkpoint is resumed from, so the node goes once there is one (what the test
    proves is "from the last registered checkpoint, not from scratch", not how fast Ray polls)."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-write
            pass
        time.sleep(0.1)
    raise TimeoutError(f"Ray registered no checkpoint in {timeout_s:.0f} s ({snapshot})")


def test_a_run_goes_on_from_its_last_checkpoint_when_a_node_is_lost(tmp_path: Path) -> None:
    result = run_as_script("tests.faults.test_node_loss", tmp_path, timeout=300)
    assert (result["nodes_at_start"], result["nodes_at_end"]) == (2, 1)
    assert result["heard"] == result["history"] == [float(e) for e in range(1, EPOCHS + 1)]
    # Checkpoints by 2 ranks, then by the 1 left: the first of those goes on from the last
    # registered checkpoint of the 2 (the epoch just reported may not have been registered when
    # the node went), not from scratch.
    before = [epoch for epoch, ranks in result["checkpoints"] if ranks == 2]
    after = [epoch for epoch, ranks in result["checkpoints"] if ranks == 1]
    assert before[0] == 1 and before == list(range(1, len(before) + 1))
    assert after == list(range(after[0], EPOCHS + 1)) and 1 < after[0] <= before[-1] + 1


if __name__ == "__main__":
    print(json.dumps(_lose_a_node_mid_run(Path(sys.argv[1]))))
