"""The cluster configs and the training image agree with Ray's own schema, with each other and
with pyproject.toml. (No cloud is called and no container engine runs here: what can be checked
without them is checked.)"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement

DEPLOY = Path(__file__).parents[2] / "deploy"
PYPROJECT = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())


def _config(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / name).read_text()))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_a_launcher_config_is_valid_for_the_pinned_ray_and_secure(name: str) -> None:
    config = _config(name)
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # Ray's own schema, shipped with the pinned Ray

    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head trains nothing
    workers = {k: v for k, v in nodes.items() if k != config["head_node_type"]}
    assert {"cpu_worker", "gpu_worker"} <= workers.keys()
    assert all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in workers.values())
    assert config["idle_timeout_minutes"] > 0
    version = PYPROJECT["project"]["version"]
    assert config["docker"]["image"].endswith(f"/raylens-train:{version}")

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
