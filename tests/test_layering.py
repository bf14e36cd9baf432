"""Imports point down only: cluster → tuning → trainer → features."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ["features", "trainer", "tuning", "cluster"]  # bottom to top
ROOT = Path(__file__).parents[1] / "raylens"


def imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "raylens" and len(parts) > 1 and parts[1] in PACKAGES:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_imports_a_package_above_its_own(package: str) -> None:
    above = set(PACKAGES[PACKAGES.index(package) + 1 :])
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_layers(path) & above)
        for path in (ROOT / package).rglob("*.py")
        if imported_layers(path) & above
    }
    assert offenders == {}, f"imports pointing up: {offenders}"


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from raylens.cluster.cli import app\nimport raylens.tuning.sweep\n")
    assert imported_layers(module) == {"cluster", "tuning"}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_alone(package: str) -> None:
    above = PACKAGES[PACKAGES.index(package) + 1 :]
    code = (
        f"import sys, raylens.{package}; "
        f"up = [m for m in sys.modules if m.split('.')[:2] in {[['raylens', p] for p in above]}]; "
        "assert not up, up"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
