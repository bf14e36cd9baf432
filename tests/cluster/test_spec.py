from pathlib import Path

import pytest

from raylens.cluster.spec import apply_overrides, check_model_params, load_spec, parse_spec
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


def test_model_parameters_are_checked_against_the_constructor() -> None:
    spec = parse_spec(spec_with(model={"params": {"hiden": [4]}}))  # the schema allows any params
    with pytest.raises(
        UserError, match=r"model\.params\.hiden: .mlp. takes no parameter .hiden.*did you mean"
    ):
        check_model_params(spec)
    sampled = parse_spec(spec_with(tune={"space": {"model.params.width": "choice([8])"}}))
    with pytest.raises(UserError, match="takes no parameter 'width'"):
        check_model_params(sampled)


def test_overrides_set_nested_keys_with_yaml_values() -> None:
    raw = spec_with(train={"epochs": 20, "optimizer": {"lr": 0.1}})
    changed = apply_overrides(
        raw,
        [
            "train.epochs=5",
            "model.params.hidden=[64, 32]",
            "train.optimizer.name=sgd",
            "tune.space.train.optimizer.lr=loguniform(1e-4, 1e-2)",
        ],
    )
    spec = parse_spec(changed)
    assert spec.train.epochs == 5 and spec.train.optimizer.lr == 0.1 and spec.train.optimizer.name == "sgd"
    assert spec.model.params == {"hidden": [64, 32]}
    assert spec.tune is not None and spec.tune.space == {"train.optimizer.lr": "loguniform(1e-4, 1e-2)"}
    assert raw["train"] == {"epochs": 20, "optimizer": {"lr": 0.1}}  # the original is untouched


def test_bad_overrides_name_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="write KEY=VALUE"):
        apply_overrides(BASE, ["train.epochs"])
    with pytest.raises(UserError, match=r"'data\.target' is a value .*not a section"):
        apply_overrides(BASE, ["data.target.x=1"])
    (tmp_path / "spec.yaml").write_text("name: d\ndata: {source: 'sklearn:iris', target: target}\n")
    with pytest.raises(UserError) as error:
        load_spec(tmp_path / "spec.yaml", ["train.epoch=3", "train.batch_size=-1"])
    message = str(error.value)
    assert "--set train.epoch=3 --set train.batch_size=-1 is not a valid experiment spec" in message
    assert "train.epoch: unknown key 'epoch' (did you mean 'epochs'?)" in message
    assert "train.batch_size:" in message


def test_the_model_section_is_validated_as_its_family_names_it() -> None:
    assert parse_spec(spec_with(model={"name": "cnn1d"})).model.family == "torch"  # no family: torch
    forest = parse_spec(
        spec_with(model={"family": "sklearn", "name": "random_forest", "params": {"max_depth": 4}})
    )
    assert forest.model.family == "sklearn" and forest.model.params == {"max_depth": 4}
    with pytest.raises(UserError) as error:
        parse_spec(spec_with(model={"family": "sklern"}))
    assert "model.family: 'sklern' is not one of torch, sklearn (did you mean 'sklearn'?)" in str(error.value)
    with pytest.raises(UserError) as error:
        parse_spec(spec_with(model={"family": "sklearn", "name": "forest"}))
    assert "model.name: 'forest' is neither a built-in estimator" in str(error.value)
    with pytest.raises(UserError) as error:
        parse_spec(spec_with(model={"family": "sklearn", "hidden": [3]}))
    assert "model.hidden: unknown key 'hidden'; valid keys here: family, name, params" in str(error.value)


def test_an_estimator_is_not_given_workers_it_cannot_use() -> None:
    sklearn = {"family": "sklearn", "name": "knn"}
    with pytest.raises(UserError, match="a scikit-learn estimator fits in one process"):
        parse_spec(spec_with(model=sklearn, train={"scaling": {"workers": 2}}))
    with pytest.raises(UserError, match=r"set tune\.workers_per_trial to 1"):
        parse_spec(
            spec_with(
                model=sklearn,
                tune={"workers_per_trial": 2, "space": {"model.params.n_neighbors": "randint(1, 9)"}},
            )
        )
