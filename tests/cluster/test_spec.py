from pathlib import Path

import pytest

from raylens.cluster.spec import load_spec, parse_spec
from raylens.errors import UserError

BASE = {"name": "digits", "data": {"source": "sklearn:digits", "target": "target"}}


def spec_with(**sections: object) -> dict:
    return {**BASE, **sections}


def test_example_spec_loads() -> None:
    """What the README says `make demo` runs."""
    spec = load_spec(Path(__file__).parents[2] / "examples" / "digits.yaml")
    assert spec.data.source == "sklearn:digits"
    assert spec.train.scaling.workers == 2 and spec.train.scaling.strategy == "ddp"
    assert spec.tune is not None
    assert (spec.tune.trials, spec.tune.concurrency, spec.tune.search, spec.tune.scheduler) == (
        6,
        2,
        "random",
        "asha",
    )
    assert spec.tracking.uri == "default" and spec.tracking.register_as == "digits-classifier"


def test_bad_choice_names_the_path_and_the_valid_values() -> None:
    with pytest.raises(UserError) as error:
        parse_spec(spec_with(train={"scaling": {"strategy": "dpp"}}))
    assert "train.scaling.strategy: 'dpp' is not one of ddp, fsdp, pipeline, auto" in str(error.value)


def test_unknown_keys_suggest_the_right_one() -> None:
    with pytest.raises(UserError) as error:
        parse_spec(spec_with(trian={}, data={**BASE["data"], "splt": {}}))
    message = str(error.value)
    assert "trian: unknown key 'trian' (did you mean 'train'?)" in message
    assert "data.splt: unknown key 'splt' (did you mean 'split'?)" in message


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(UserError) as error:
        parse_spec(spec_with(train={"epochs": 0, "optimizer": {"lr": -1}}))
    assert "train.epochs:" in str(error.value) and "train.optimizer.lr:" in str(error.value)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"scaling": {"strategy": "fsdp", "workers": 1}}}, "fsdp shards the model across workers"),
        ({"data": {"source": "sklearn:digits"}}, "data.target: required key is missing"),
        ({"data": {**BASE["data"], "split": {"valid": 0.5, "test": 0.5}}}, "leaves too little to train on"),
        ({"model": {"name": "resnet"}}, "'resnet' is neither a built-in model"),
        ({"model": {"params": {"hiden": [4]}}}, "did you mean 'hidden'"),
        ({"tune": {"space": {}}}, "a sweep needs at least one path to tune"),
        ({"tune": {"space": {"train.optimizer.lr": "loguniform(0, 1)"}}}, "loguniform needs low > 0"),
        ({"name": "my run"}, "name: String should match pattern"),
    ],
)
def test_invalid_values_fail_at_load(sections: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_spec(spec_with(**sections))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="is a mapping"):
        load_spec(tmp_path / "list.yaml")
