"""`raylens train --address` on an autoscaling cluster: the run asks for more workers than the head
has, the autoscaler adds nodes for them, the run finishes, and the idle nodes go away.

The cluster is Ray's fake multi-node provider behind a real head (``tests.servers.autoscaling_ray_head``):
its nodes are raylets the head's autoscaler starts and stops on this machine, as a cloud provider
would start and stop machines. The test drives it from a subprocess (this module run as a script),
as the node-loss test does, so the test session's own Ray cluster stays as it is.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from sklearn.datasets import load_iris

from tests.cli import RAYLENS
from tests.servers import autoscaling_ray_head, clean_environment, run_as_script

SPEC = """
name: autoscaled
data: {source: iris.csv, target: target, split: {valid: 0.2, test: 0.2, seed: 3}}
features: {transforms: [{standardize: "*"}]}
model: {name: mlp, params: {hidden: [16]}}
train:
  epochs: 1
  batch_size: 32
  scaling: {workers: 1, cpus_per_worker: 1}
"""


def _alive(nodes: list[dict[str, object]]) -> int:
    return sum(1 for node in nodes if node["Alive"])


def _train_on_an_autoscaling_cluster(folder: Path) -> dict[str, object]:
    token = secrets.token_hex(16)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    os.environ.update(auth)  # before Ray is imported: it reads the token once
    import ray

    project, runs, head = folder / "project", folder / "runs", folder / "head"
    for made in (project, head):
        made.mkdir(parents=True)
    (project / "spec.yaml").write_text(SPEC)
    load_iris(as_frame=True).frame.to_csv(project / "iris.csv", index=False)
    # As in deploy/: the head has no CPU for work, so the training worker waits for a node; the
    # autoscaler's nodes have 1 CPU each.
    with autoscaling_ray_head(head, head_cpus=0, worker_cpus=1, max_workers=3, token=token) as address:
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=address, log_to_driver=False, logging_level="error")
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        nodes_before = _alive(ray.nodes())
        training = subprocess.Popen(
            [RAYLENS, "train", str(project / "spec.yaml"), "--address", address, "--runs-dir", str(runs)],
            cwd=project,
            env={**clean_environment(), **auth},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        most_nodes = nodes_before
        while training.poll() is None:
            most_nodes = max(most_nodes, _alive(ray.nodes()))
            time.sleep(0.5)
        output = training.stdout.read() if training.stdout else ""
        # Idle for 3 s (the config's idle timeout), the added nodes are removed.
        deadline = time.monotonic() + 90
        while _alive(ray.nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        nodes_after = ray.nodes()
        ray.shutdown()
    return {
        "returncode": training.returncode,
        "output": output[-4000:],
        "nodes_before": nodes_before,
        "most_nodes": most_nodes,
        "alive_after": _alive(nodes_after),
        "known_after": len(nodes_after),
    }


def test_a_run_larger_than_the_head_makes_the_autoscaler_add_nodes_that_go_away_when_idle(
    tmp_path: Path,
) -> None:
    result = run_as_script("tests.cluster.test_autoscaling", tmp_path, timeout=600)
    assert result["returncode"] == 0, result["output"]
    said = " ".join(str(result["output"]).split())
    assert "Ray waits until the cluster has them (if it autoscales)" in said, said
    assert result["nodes_before"] == 1
    assert result["most_nodes"] == 2  # the head and one node for the worker
    assert result["alive_after"] == 1 and result["known_after"] == result["most_nodes"]  # added, then removed

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("autoscaled").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    (final,) = [r for r in runs if r.data.tags.get("raylens.role") == "final"]
    assert "test_accuracy" in final.data.metrics


if __name__ == "__main__":
    print(json.dumps(_train_on_an_autoscaling_cluster(Path(sys.argv[1]))))
