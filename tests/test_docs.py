"""README: "Every field is documented where it is defined" — each field of the spec's typed
configs is followed by its docstring (what `raylens` users read, and editors show)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CONFIGS = [
    "raylens/features/config.py",
    "raylens/trainer/config.py",
    "raylens/trainer/debug/settings.py",
    "raylens/tuning/config.py",
    "raylens/cluster/spec.py",
]


def undocumented(source: str) -> list[str]:
    missing = []
    for cls in (n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)):
        for field, after in zip(cls.body, [*cls.body[1:], None], strict=True):
            if not (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)):
                continue
            if field.target.id == "model_config":
                continue
            documented = isinstance(after, ast.Expr) and isinstance(
                getattr(after, "value", None), ast.Constant
            )
            if not documented or not isinstance(after.value.value, str):  # type: ignore[union-attr]
                missing.append(f"{cls.name}.{field.target.id}")
    return missing


@pytest.mark.parametrize("path", CONFIGS)
def test_every_spec_field_has_a_docstring(path: str) -> None:
    assert undocumented((ROOT / path).read_text()) == []


def test_the_check_finds_an_undocumented_field() -> None:
    assert undocumented('class C:\n    a: int = 1\n    """doc"""\n    b: int = 2\n') == ["C.b"]


def test_the_spec_reference_is_current() -> None:
    """docs/spec.md is `raylens spec`'s output: regenerate it (`raylens spec > docs/spec.md`) when
    a config changes."""
    from raylens.cluster.spec import spec_reference

    assert (ROOT / "docs" / "spec.md").read_text() == spec_reference()


def test_the_spec_reference_names_every_key_and_metric() -> None:
    from raylens.cluster.spec import spec_reference

    reference = spec_reference()
    for key in (
        "`data.task`",
        "`train.scaling.use_gpu`",
        "`tune.grace_period`",
        "`features.transforms[].standardize`",
    ):
        assert key in reference
    assert "`valid_accuracy`" in reference and "`valid_r2`" in reference


def test_the_github_workflow_runs_what_ci_runs() -> None:
    """A fork gets CI without reading the Makefile: the workflow runs `make test`, as .ci/run does."""
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    runs = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    assert runs == ["make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_scheduled_ct_workflow_checks_a_valid_spec() -> None:
    """The continuous-training workflow and README's cron line run `raylens ct check` on a spec
    that validates."""
    import yaml

    from raylens.cluster.spec import load_spec

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ct.yml").read_text())
    assert workflow[True]["schedule"][0]["cron"]  # YAML reads the key `on` as True
    runs = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    checks = [run.split() for run in runs if "ct check" in run]
    assert checks and checks[0][:3] == [".venv/bin/raylens", "ct", "check"]
    spec = load_spec(ROOT / checks[0][3])
    assert spec.tracking.register_as is not None
    readme = (ROOT / "README.md").read_text()
    assert f"raylens ct check {checks[0][3]}" in readme
