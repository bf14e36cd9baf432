"""Imports point down only: cluster → tuning → trainer → features."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ["features", "trainer", "tuning", "cluster"]  # bottom to top
ROOT = Path(__file__).parents[1] / "raylens"


def imported_layers(path: Path, module_parts: list[str] | None = None) -> set[str]:
    """The raylens packages a module imports, however it is written: ``import raylens.x.y``,
    ``from raylens.x import y``, ``from raylens import x`` and relative imports (``from .. import
    x``, ``from ..x.y import z``), resolved against the module's own place in the package."""
    parts_of_module = module_parts or list(path.relative_to(ROOT.parent).with_suffix("").parts)
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[list[str]] = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: drop the module itself, then one package per extra dot
                base = parts_of_module[: len(parts_of_module) - node.level]
            else:
                base = []
            module = base + (node.module.split(".") if node.module else [])
            names = [[*module, alias.name] for alias in node.names]
        for name in names:
            if name[0] == "raylens" and len(name) > 1 and name[1] in PACKAGES:
                layers.add(name[1])
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


@pytest.mark.parametrize(
    ("statement", "layer"),
    [
        ("from raylens.cluster.cli import app", "cluster"),
        ("import raylens.tuning.sweep", "tuning"),
        ("from raylens import tuning", "tuning"),
        ("from raylens import errors, cluster as c", "cluster"),
        ("from .. import tuning", "tuning"),
        ("from ..cluster.spec import load_spec", "cluster"),
        ("from . import transforms", "features"),  # its own layer: allowed by the layering test
        ("import tuning", None),  # some other top-level package called tuning
    ],
)
def test_the_check_catches_every_way_of_writing_an_upward_import(
    statement: str, layer: str | None, tmp_path: Path
) -> None:
    """Scanned as if it were raylens/features/probe.py (the bottom layer)."""
    module = tmp_path / "probe.py"
    module.write_text(statement + "\n")
    found = imported_layers(module, ["raylens", "features", "probe"])
    assert found == ({layer} if layer else set())


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_alone(package: str) -> None:
    above = PACKAGES[PACKAGES.index(package) + 1 :]
    code = (
        f"import sys, raylens.{package}; "
        f"up = [m for m in sys.modules if m.split('.')[:2] in {[['raylens', p] for p in above]}]; "
        "assert not up, up"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def type_checking_imports(init: Path) -> dict[str, set[str]]:
    """Names each module gives the ``if TYPE_CHECKING:`` block of a package's ``__init__``."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom) and statement.module
                found.setdefault(statement.module, set()).update(a.name for a in statement.names)
    return found


@pytest.mark.parametrize("package", ["features", "trainer", "tuning"])
def test_lazy_exports_are_what_the_type_checker_sees(package: str) -> None:
    """Each export resolves to the object of the module the type checker was told, and importing
    the package imports none of them (reading the configs stays free of torch and pyarrow)."""
    import importlib

    declared = type_checking_imports(ROOT / package / "__init__.py")
    code = (
        f"import sys, raylens.{package}; "
        "heavy = [m for m in ('torch', 'numpy', 'pyarrow', 'ray', 'mlflow') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    module = importlib.import_module(f"raylens.{package}")
    assert sorted(module.__all__) == sorted(name for names in declared.values() for name in names)
    for home, names in declared.items():
        for name in names:
            assert getattr(module, name) is getattr(importlib.import_module(home), name)
