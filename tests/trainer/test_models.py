import pytest
import torch

from raylens.errors import UserError
from raylens.trainer import TorchModelConfig, build_model, check_params


def test_builtin_models_give_the_right_output_shape() -> None:
    x = torch.randn(5, 12)
    assert build_model(TorchModelConfig(name="mlp", params={"hidden": [8, 4]}), 12, 3)(x).shape == (5, 3)
    assert build_model(TorchModelConfig(name="cnn1d", params={"channels": [4]}), 12, 2)(x).shape == (5, 2)


def test_user_factory_is_imported_and_called() -> None:
    config = TorchModelConfig(name="tests.trainer.user_models:tiny", params={"width": 3})
    check_params(config)
    model = build_model(config, 4, 2)
    assert model(torch.randn(2, 4)).shape == (2, 2)


def test_unknown_params_and_factories_are_named() -> None:
    with pytest.raises(UserError, match=r"takes no parameter 'hiden' \(did you mean 'hidden'\?\)"):
        check_params(TorchModelConfig(name="mlp", params={"hiden": [3]}))
    with pytest.raises(UserError, match=r"cannot import 'no_such_pkg\.models'"):
        check_params(TorchModelConfig(name="no_such_pkg.models:build"))
    with pytest.raises(UserError, match="has no callable 'nope'"):
        check_params(TorchModelConfig(name="tests.trainer.user_models:nope"))
    with pytest.raises(UserError, match="activation: 'relux' is not one of"):
        build_model(TorchModelConfig(name="mlp", params={"activation": "relux"}), 4, 2)
