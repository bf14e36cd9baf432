import random

import pytest

from raylens.errors import UserError
from raylens.trainer import TorchModelConfig, TrainConfig
from raylens.tuning import check_space, parse_space, with_overrides
from raylens.tuning.space import parse_distribution


def test_distributions_parse_and_sample_in_range() -> None:
    rng = random.Random(0)
    lr = parse_distribution("train.optimizer.lr", "loguniform(1e-4, 1e-1)")
    assert lr.kind == "loguniform" and 1e-4 <= lr.sample(rng) <= 1e-1
    hidden = parse_distribution("model.params.hidden", "choice([[64], [128, 64]])")
    assert hidden.sample(rng) in ([64], [128, 64])
    assert parse_distribution("train.batch_size", "choice(16, 32)").args == ([16, 32],)
    assert 1 <= parse_distribution("train.epochs", "randint(1, 5)").sample(rng) < 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lognormal(1, 2)", "unknown distribution 'lognormal'"),
        ("0.1", "is not a distribution"),
        ("uniform(1)", "takes two numbers"),
        ("uniform(2, 1)", "needs low < high"),
        ("loguniform(0, 1)", "needs low > 0"),
        ("randint(1.5, 3)", "takes whole numbers"),
        ("choice([])", "at least one value"),
        ("uniform(a, b)", "must be literal"),
    ],
)
def test_bad_distributions_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_distribution("train.optimizer.lr", text)


def test_only_model_and_train_paths_are_tunable() -> None:
    with pytest.raises(UserError, match=r"only paths under model\. and train\."):
        parse_space({"data.split.seed": "randint(0, 3)"})


def test_overrides_make_new_validated_configs() -> None:
    model, train = with_overrides(
        TorchModelConfig(), TrainConfig(), {"train.optimizer.lr": 0.05, "model.params.hidden": [8]}
    )
    assert train.optimizer.lr == 0.05 and model.params == {"hidden": [8]}
    assert TrainConfig().optimizer.lr == 1e-3  # the originals are untouched


def test_space_that_samples_invalid_values_fails_at_load() -> None:
    with pytest.raises(UserError, match=r"train\.batch_size does not fit"):
        check_space(parse_space({"train.batch_size": "uniform(8, 64)"}), TorchModelConfig(), TrainConfig())
    with pytest.raises(UserError, match="takes no parameter 'width'"):
        check_space(parse_space({"model.params.width": "choice([8])"}), TorchModelConfig(), TrainConfig())
    with pytest.raises(UserError, match=r"train\.optimizer\.lrr does not fit"):
        check_space(
            parse_space({"train.optimizer.lrr": "uniform(0.1, 0.2)"}), TorchModelConfig(), TrainConfig()
        )
