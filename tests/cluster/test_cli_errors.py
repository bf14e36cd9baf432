"""Bad input: one clear message, exit code 2, no traceback, nothing written."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raylens.cluster.cli import app

SPEC = """
name: bad
data: {{source: "{source}", target: {target}}}
train: {{epochs: 1}}
"""


def write_spec(
    folder: Path, source: str = "sklearn:iris", target: str = "target", text: str | None = None
) -> Path:
    path = folder / "spec.yaml"
    path.write_text(text if text is not None else SPEC.format(source=source, target=target))
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (lambda d: d / "missing.yaml", "spec file"),
        (lambda d: write_spec(d, source="sklearn:digts"), "unknown scikit-learn data set 'digts'"),
        (lambda d: write_spec(d, source="nowhere.parquet"), "'nowhere.parquet' does not exist"),
        (lambda d: write_spec(d, target="label"), "column 'label' is not in the data"),
        (lambda d: write_spec(d, source="text.parquet"), "feature column 'word' has type string"),
        (lambda d: write_spec(d, source="empty.parquet"), "has no rows"),
        (
            lambda d: write_spec(
                d,
                text=SPEC.format(source="sklearn:iris", target="target")
                + "  # strategy below is a typo\n"
                + "model: {name: mlp}\n".replace("mlp", "mpl"),
            ),
            "'mpl' is neither a built-in model",
        ),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path: Path, make_spec, message: str) -> None:  # type: ignore[no-untyped-def]
    pq.write_table(pa.table({"word": ["a", "b"], "target": [0, 1]}), tmp_path / "text.parquet")
    pq.write_table(
        pa.table({"x": pa.array([], pa.float64()), "target": pa.array([], pa.int64())}),
        tmp_path / "empty.parquet",
    )
    runs = tmp_path / "runs"
    code, output = invoke("train", str(make_spec(tmp_path)), "--runs-dir", str(runs))
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output
    assert not runs.exists() or not any(p.is_file() for p in runs.rglob("*"))


def test_invalid_spec_value_lists_the_valid_ones(tmp_path: Path) -> None:
    text = SPEC.format(source="sklearn:iris", target="target").replace(
        "train: {epochs: 1}", "train: {epochs: 1, scaling: {strategy: dpp}}"
    )
    code, output = invoke("run", str(write_spec(tmp_path, text=text)), "--runs-dir", str(tmp_path / "runs"))
    assert code == 2
    assert "train.scaling.strategy: 'dpp' is not one of ddp, fsdp, pipeline, auto" in output


def test_help_explains_the_commands() -> None:
    code, output = invoke("--help")
    assert code == 0
    for command in ("run", "train", "tune", "features", "ui"):
        assert command in output


def test_ui_defaults_to_port_5000_on_loopback() -> None:
    code, shown = invoke("ui", "--help")
    assert code == 0 and "5000" in shown and "127.0.0.1" in shown


def test_features_commands_on_an_empty_store(tmp_path: Path) -> None:
    code, output = invoke("features", "list", "--runs-dir", str(tmp_path))
    assert code == 0 and "no feature sets stored yet" in output
    code, output = invoke("features", "show", "iris", "--runs-dir", str(tmp_path))
    assert code == 2 and "no feature set named 'iris'" in output
    code, output = invoke("ui", "--runs-dir", str(tmp_path))
    assert code == 2 and "no runs in" in output


def test_features_build_then_list_and_show(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    code, output = invoke("features", "build", str(spec), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, output
    code, listing = invoke("features", "list", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0 and "bad" in listing and "105/22/23" in listing
    code, shown = invoke("features", "show", "bad", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0 and "train 105 / valid 22 / test 23" in shown


def test_messages_print_verbatim_never_as_markup(tmp_path: Path) -> None:
    """A fix written in YAML (`data.drop: [plan]`) looks like terminal markup; it must arrive whole."""
    rows = "\n".join(f"{'basic' if i % 2 else 'pro'},{i / 10},{i % 2}" for i in range(20))
    (tmp_path / "churn.csv").write_text("plan,usage,target\n" + rows + "\n")
    code, output = invoke("features", "build", str(write_spec(tmp_path, source="churn.csv")))
    assert code == 2
    assert "leave it out with data.drop: [plan]" in " ".join(output.split())


def test_version() -> None:
    from raylens import __version__

    code, output = invoke("--version")
    assert code == 0 and output.strip() == f"raylens {__version__}"
