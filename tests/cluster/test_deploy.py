"""The cluster configs, the KubeRay manifests and the training image agree with Ray's own schema,
KubeRay's, each other and pyproject.toml. (No cloud or Kubernetes cluster is called and no
container engine runs here: what can be checked without them is checked.)"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from raylens.cluster.submit import plan_submission
from tests.cluster.kuberay_required import API_VERSION, SCHEMAS

DEPLOY = Path(__file__).parents[2] / "deploy"
PYPROJECT = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())


def _config(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / name).read_text()))


def _ray_schema() -> dict[str, Any]:
    return dict(json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text()))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_a_launcher_config_is_valid_for_the_pinned_ray_and_secure(name: str) -> None:
    config = _config(name)
    jsonschema.validate(config, _ray_schema())  # Ray's own schema, shipped with the pinned Ray

    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head trains nothing
    workers = {k: v for k, v in nodes.items() if k != config["head_node_type"]}
    assert {"cpu_worker", "gpu_worker"} <= workers.keys()
    assert all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers.values())
    assert config["idle_timeout_minutes"] > 0
    version = PYPROJECT["project"]["version"]
    assert config["docker"]["image"].endswith(f"/raylens-train:{version}")
    # GPU workers run the GPU build (the CPU image's torch has no CUDA); the others the image above.
    assert nodes["gpu_worker"]["docker"]["worker_image"] == config["docker"]["image"] + "-gpu"
    assert all("docker" not in w for k, w in workers.items() if k != "gpu_worker")

    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "RAY_AUTH_MODE=token ray start --address" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard`
    assert "--num-cpus=0" in head_start
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_the_image_pins_what_pyproject_allows_on_the_official_ray_image() -> None:
    pins = _constraints()
    for dependency in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = requirement.name.lower()
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {dependency}"
    assert pins["ray"] == ray.__version__

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    image = re.search(
        r"^ARG RAY_IMAGE=rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d)(?P<minor>\d+)-cpu$", dockerfile, re.M
    )
    assert image is not None, "the Dockerfile builds FROM an official rayproject/ray image"
    assert image["ray"] == pins["ray"]
    python = f"{image['py']}.{image['minor']}"
    assert Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier.contains(python)
    assert re.search(r"^USER ray$", dockerfile, re.M)  # not root
    assert "-c deploy/constraints.txt" in dockerfile


# KubeRay (deploy/kuberay/): a RayCluster, and a RayJob that starts the same cluster for one run.

KUBERAY = DEPLOY / "kuberay"
TOKEN_SECRET = "raylens-ray-token"
TOKEN_KEY = "auth_token"  # the key KubeRay reads from the Secret of authOptions.secretName
RUNS_CLAIM = "raylens-runs"
RUNS_MOUNT = "/mnt/raylens-runs"  # where every node mounts the run folder
SPEC_DIR = "/home/ray/project"  # where the RayJob's head mounts the spec to run
MANIFESTS = ["raycluster.yaml", "rayjob.yaml"]


def _manifest(name: str) -> dict[str, Any]:
    # Through JSON, as kubectl sends it: what a YAML alias shares becomes copies of its own.
    manifest: dict[str, Any] = json.loads(json.dumps(yaml.safe_load((KUBERAY / name).read_text())))
    return manifest


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]
    return spec["rayClusterSpec"] if manifest["kind"] == "RayJob" else spec


def _groups(cluster_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    workers = {group["groupName"]: group for group in cluster_spec["workerGroupSpecs"]}
    return {"head": cluster_spec["headGroupSpec"], **workers}


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = group["template"]["spec"]["containers"][0]  # KubeRay: Ray's is the first
    return container


def _pod_templates(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template of a manifest: each group's, and a RayJob's submitter."""
    for name, group in _groups(_cluster_spec(manifest)).items():
        yield name, group["template"]
    if "submitterPodTemplate" in manifest["spec"]:
        yield "submitter", manifest["spec"]["submitterPodTemplate"]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def _errors(manifest: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMAS[manifest["kind"]])
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(manifest)
    ]


@pytest.mark.parametrize("name", MANIFESTS)
def test_a_kuberay_manifest_has_what_the_kuberay_crd_requires(name: str) -> None:
    manifest = _manifest(name)
    jsonschema.Draft202012Validator.check_schema(SCHEMAS[manifest["kind"]])
    assert manifest["apiVersion"] == API_VERSION
    assert _errors(manifest) == []
    for where, template in _pod_templates(manifest):
        for container in template["spec"]["containers"]:
            assert container.get("image"), f"{where}: Kubernetes creates no pod without an image"
            names = [variable["name"] for variable in container.get("env", [])]
            # env is a list keyed by name: the API server refuses a name given twice.
            assert len(names) == len(set(names)), f"{where}: {names}"


def _drop_group_name(manifest: dict[str, Any]) -> None:
    del _cluster_spec(manifest)["workerGroupSpecs"][0]["groupName"]


def _unknown_upscaling_mode(manifest: dict[str, Any]) -> None:
    _cluster_spec(manifest)["autoscalerOptions"]["upscalingMode"] = "Fast"


def _misspelt_field(manifest: dict[str, Any]) -> None:
    spec = _cluster_spec(manifest)
    spec["workerGroups"] = spec.pop("workerGroupSpecs")


def _unquoted_num_cpus(manifest: dict[str, Any]) -> None:
    _cluster_spec(manifest)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _secret_without_key(manifest: dict[str, Any]) -> None:
    token = _env(_ray_container(_cluster_spec(manifest)["headGroupSpec"]))["RAY_AUTH_TOKEN"]
    del token["valueFrom"]["secretKeyRef"]["key"]


def _no_containers(manifest: dict[str, Any]) -> None:
    _cluster_spec(manifest)["workerGroupSpecs"][1]["template"]["spec"]["containers"] = []


@pytest.mark.parametrize("name", MANIFESTS)
@pytest.mark.parametrize(
    ("break_it", "refused"),
    [
        (_drop_group_name, "workerGroupSpecs.0: 'groupName' is a required property"),
        (_unknown_upscaling_mode, "autoscalerOptions.upscalingMode: 'Fast' is not one of"),
        (_misspelt_field, "'workerGroups' was unexpected"),
        (_unquoted_num_cpus, "rayStartParams.num-cpus: 0 is not of type 'string'"),
        (_secret_without_key, "secretKeyRef: 'key' is a required property"),
        (_no_containers, "containers: [] should be non-empty"),
    ],
)
def test_the_kuberay_schema_refuses_a_manifest_kuberay_would_refuse(
    name: str, break_it: Callable[[dict[str, Any]], None], refused: str
) -> None:
    manifest = _manifest(name)
    assert _errors(manifest) == []
    break_it(manifest)
    errors = _errors(manifest)
    assert len(errors) == 1 and refused in errors[0], errors


@pytest.mark.parametrize("name", MANIFESTS)
def test_rays_kuberay_autoscaler_reads_the_cluster_as_intended(name: str) -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    manifest = _manifest(name)
    cluster_spec = _cluster_spec(manifest)
    # The autoscaler reads the live RayCluster, which has a namespace (kubectl's current one).
    live = {"metadata": {**manifest["metadata"], "namespace": "default"}, "spec": cluster_spec}
    config = _derive_autoscaling_config_from_ray_cr(live)  # the pinned Ray's own translation
    jsonschema.validate(config, _ray_schema())

    nodes = config["available_node_types"]
    assert nodes.pop("headgroup")["resources"]["CPU"] == 0  # the head trains nothing
    assert {"cpu-worker", "gpu-worker"} == nodes.keys()
    assert all(node["min_workers"] == 0 and node["max_workers"] >= 1 for node in nodes.values())
    assert nodes["cpu-worker"]["resources"]["CPU"] >= 1 and "GPU" not in nodes["cpu-worker"]["resources"]
    assert nodes["gpu-worker"]["resources"]["GPU"] >= 1
    idle_seconds = cluster_spec["autoscalerOptions"]["idleTimeoutSeconds"]
    assert idle_seconds > 0 and config["idle_timeout_minutes"] == idle_seconds / 60
    assert cluster_spec["enableInTreeAutoscaling"] is True
    assert cluster_spec["rayVersion"] == ray.__version__


def _assert_token_from_the_secret(where: str, container: dict[str, Any]) -> None:
    env = _env(container)
    assert env.get("RAY_AUTH_MODE") == {"name": "RAY_AUTH_MODE", "value": "token"}, where
    token = env.get("RAY_AUTH_TOKEN", {})
    assert "value" not in token, f"{where}: a token written into the manifest"
    assert token.get("valueFrom") == {"secretKeyRef": {"name": TOKEN_SECRET, "key": TOKEN_KEY}}, where


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_node_requires_the_token_runs_non_root_and_shares_the_run_folder(name: str) -> None:
    manifest = _manifest(name)
    cluster_spec = _cluster_spec(manifest)
    # KubeRay puts the same token into what it adds (the autoscaler, init containers, the
    # submitter) and uses it for its own dashboard calls; token auth needs Ray 2.52 or later.
    assert cluster_spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    assert Version(cluster_spec["rayVersion"]) >= Version("2.52.0")

    head = cluster_spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # reached with `kubectl port-forward`, not from outside
    assert head["rayStartParams"]["num-cpus"] == "0"

    shared = set()
    for where, template in _pod_templates(manifest):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == 1000, where  # the Ray image's `ray` user
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            for variable in container.get("env", []):
                assert not str(variable.get("value", "")).startswith(("sqlite:", "file:")), where
        container = pod["containers"][0]
        _assert_token_from_the_secret(where, container)
        if where == "submitter":
            continue  # it calls the Jobs API only
        uri = _env(container)["MLFLOW_TRACKING_URI"]
        assert "value" not in uri and uri["valueFrom"].keys() <= {"secretKeyRef", "configMapKeyRef"}, where
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {
            (claims[m["name"]], m["mountPath"]) for m in container["volumeMounts"] if m["name"] in claims
        }
        assert len(mounts) == 1, f"{where}: {mounts}"
        shared |= mounts
    assert shared == {(RUNS_CLAIM, RUNS_MOUNT)}, f"not one run folder on every node: {shared}"


def test_the_rayjob_submits_what_raylens_submit_would_to_the_same_cluster(tmp_path: Path) -> None:
    job = _manifest("rayjob.yaml")
    cluster_spec = copy.deepcopy(job["spec"]["rayClusterSpec"])
    # The one difference from raycluster.yaml: the spec to run, mounted on the head, where a
    # job's driver runs.
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    mounts = head["containers"][0]["volumeMounts"]
    [spec_mount] = [m for m in mounts if m["mountPath"] == SPEC_DIR]
    mounts.remove(spec_mount)
    [spec_volume] = [v for v in head["volumes"] if v["name"] == spec_mount["name"]]
    head["volumes"].remove(spec_volume)
    assert spec_volume["configMap"]["name"] == "raylens-spec"
    assert cluster_spec == _manifest("raycluster.yaml")["spec"]  # groups, images, env, autoscaling

    (tmp_path / "spec.yaml").write_text("name: demo\n")
    submitted = plan_submission(
        tmp_path / "spec.yaml", spec_name="demo", runs_dir=RUNS_MOUNT, tracking_uri="http://mlflow:5000"
    )
    expected = shlex.split(submitted.entrypoint)
    expected[expected.index("spec.yaml")] = f"{SPEC_DIR}/spec.yaml"
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint == expected  # python -m raylens.cluster.cli run SPEC --address auto --runs-dir ...
    assert Path(entrypoint[entrypoint.index("--runs-dir") + 1]).is_relative_to(RUNS_MOUNT)
    # The job's environment as submit sets it; the tracking URI comes from the cluster's Secret.
    env_vars = {k: v for k, v in submitted.runtime_env["env_vars"].items() if k != "MLFLOW_TRACKING_URI"}
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"env_vars": env_vars}
    # Without entrypoint resources Ray runs the driver on the head, where the spec is.
    assert not {"entrypointNumCpus", "entrypointNumGpus", "entrypointResources"} & job["spec"].keys()
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_kuberay_manifests_run_the_training_image_of_this_version(name: str) -> None:
    version = PYPROJECT["project"]["version"]
    image = _config("aws.yaml")["docker"]["image"]  # the launcher configs' image and tag
    assert image == _config("gcp.yaml")["docker"]["image"] and image.endswith(f"/raylens-train:{version}")
    gpu_image = f"{image}-gpu"
    assert f"-t {gpu_image} " in (DEPLOY / "Dockerfile").read_text()  # how the GPU build is tagged

    manifest = _manifest(name)
    for where, template in _pod_templates(manifest):
        container = template["spec"]["containers"][0]
        wants_gpu = "nvidia.com/gpu" in container["resources"].get("limits", {})
        assert container["image"] == (gpu_image if wants_gpu else image), where
    gpu_worker = _ray_container(_groups(_cluster_spec(manifest))["gpu-worker"])
    assert "nvidia.com/gpu" in gpu_worker["resources"]["limits"]
