"""`raylens run --address ray://…` on a two-node cluster (``ray.cluster_utils.Cluster``, token auth
on), through Ray Client: the sweep's trials and a 2-worker DDP training run on it, with the run
folder on storage that is not the driver's working folder, and the registered model predicts.
Through Ray Client, Tune's loop runs on the cluster: every trial must still be tracked in MLflow
by the driver here. Without token mode the run is refused with what to set.

The cluster lives in a subprocess (this module run as a script), as in the node-loss test: the
test session's own Ray cluster stays as it is. Both nodes share this machine's file system, as
nodes share an NFS mount: what it proves is that everything the cluster reads and writes goes
through the run folder given, not the driver's working folder. (Ray places the workers; that a
DDP group spans two nodes is shown by ``tests/faults/test_node_loss.py``, whose run had a worker
on each.)
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from sklearn.datasets import load_iris

from tests.cli import RAYLENS
from tests.servers import clean_environment, free_port, run_as_script

SPEC = """
name: two-nodes
data: {source: iris.csv, target: target, split: {valid: 0.2, test: 0.2, seed: 3}}
features: {transforms: [{standardize: "*"}]}
model: {name: mlp, params: {hidden: [16]}}
train:
  epochs: 1
  batch_size: 32
  optimizer: {lr: 0.05}
  scaling: {workers: 2, strategy: ddp}
tune:
  trials: 2
  concurrency: 2
  scheduler: fifo
  epochs: 1
  space: {train.optimizer.lr: "choice([0.02, 0.05])"}
tracking: {register_as: two-nodes}
"""


def _run_on_two_nodes(folder: Path) -> dict[str, object]:
    # Token auth on with a token of this cluster's own, set before Ray is imported (it reads the
    # token once); the run is handed the same, as a user of a secured cluster would be.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    os.environ.update(auth)
    from ray.cluster_utils import Cluster

    project, runs, elsewhere = folder / "project", folder / "shared" / "runs", folder / "elsewhere"
    for made in (project, elsewhere):
        made.mkdir(parents=True)
    (project / "spec.yaml").write_text(SPEC)
    load_iris(as_frame=True).frame.to_csv(project / "iris.csv", index=False)
    client_port = free_port()
    head = {"num_cpus": 2, "ray_client_server_port": client_port}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:

        def raylens(
            command: str, address: str, env: dict[str, str], runs: Path = runs
        ) -> subprocess.CompletedProcess[str]:
            args = [str(project / "spec.yaml"), "--address", address, "--runs-dir", str(runs)]
            return subprocess.run(
                [RAYLENS, command, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
            )

        # Side by side: one without the token (Ray refuses the driver, in seconds), and through Ray
        # Client one with it (Tune's loop runs on the cluster, the trials are still tracked here).
        # Each its own run folder: both create their MLflow store as Ray starts.
        with ThreadPoolExecutor(max_workers=2) as pool:
            refusing = pool.submit(raylens, "train", cluster.address, clean_environment(), folder / "refused")
            done = raylens("run", f"ray://127.0.0.1:{client_port}", {**clean_environment(), **auth})
            refused = refusing.result()
    finally:
        cluster.shutdown()
    return {
        "returncode": done.returncode,
        "output": done.stdout[-3000:] + done.stderr[-3000:],
        "refused": [refused.returncode, refused.stdout + refused.stderr],
    }


def test_a_sweep_and_a_two_worker_run_on_a_two_node_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_as_script("tests.cluster.test_two_nodes", tmp_path, timeout=900)
    code, said = result["refused"]
    assert code == 2 and "needs RAY_AUTH_MODE=token here too" in " ".join(said.split()), said
    assert "Traceback" not in said
    assert result["returncode"] == 0, result["output"]

    runs = tmp_path / "shared" / "runs"
    assert list((tmp_path / "elsewhere").iterdir()) == []  # nothing in the driver's working folder
    assert (runs / "features").is_dir() and (runs / "ray").is_dir()
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    trials = client.search_runs(
        [client.get_experiment_by_name("two-nodes").experiment_id], "tags.`raylens.role` = 'trial'"
    )
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    (version,) = client.search_model_versions("name='two-nodes'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{runs / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/two-nodes/{version.version}")
    iris = load_iris(as_frame=True).frame
    predicted = model.predict(pd.DataFrame(iris.drop(columns="target")))
    assert len(predicted) == len(iris)


if __name__ == "__main__":
    print(json.dumps(_run_on_two_nodes(Path(sys.argv[1]))))
