"""Candidates and searchers: a space that does not fit its searcher is refused before any trial."""

import pytest

from raylens.cluster.spec import parse_spec
from raylens.errors import UserError
from raylens.trainer import SklearnModelConfig, TorchModelConfig
from raylens.tuning import TuneConfig, candidates_of
from raylens.tuning.candidates import spec_values

BASE = {"name": "cancer", "data": {"source": "sklearn:breast_cancer", "target": "target"}}
FOREST = {"family": "sklearn", "name": "random_forest"}


def tuned(**tune: object) -> dict:
    return {**BASE, "tune": tune}


def test_a_trial_of_a_candidate_becomes_that_candidates_model_and_values() -> None:
    config = TuneConfig(
        space={"train.seed": "randint(0, 3)"},
        candidates=[
            {"model": FOREST, "space": {"model.params.max_depth": "randint(2, 9)"}},
            {
                "name": "net",
                "model": {"name": "mlp"},
                "space": {"train.optimizer.lr": "loguniform(1e-4, 1e-1)"},
            },
        ],
    )
    forest, net = candidates_of(config, TorchModelConfig())
    assert (forest.name, net.name) == ("sklearn.random_forest", "net")
    assert set(forest.space) == {"train.seed", "model.params.max_depth"}
    drawn = {"candidate": "sklearn.random_forest", "sklearn.random_forest:model.params.max_depth": 4}
    values = spec_values({**drawn, "sklearn.random_forest:train.seed": 2}, [forest, net])
    assert values == {
        "model": SklearnModelConfig(name="random_forest").model_dump(),
        "model.params.max_depth": 4,
        "train.seed": 2,
    }


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        (
            {"search": "tpe", "space": {"model.params.hidden": "choice([[64], [128, 64]])"}},
            r"tune\.space\.model\.params\.hidden: Optuna .* chooses among numbers, strings, booleans",
        ),
        (
            {"search": "grid", "space": {"train.optimizer.lr": "loguniform(1e-4, 1e-1)"}},
            r"tune\.space\.train\.optimizer\.lr: grid search tries listed values only; write choice",
        ),
        (
            {"space": {"model.params.max_depth": "randint(2, 5)"}, "candidates": [{"model": FOREST}]},
            r"tune\.space\.model\.params\.max_depth: with tune\.candidates, tune\.space holds the train",
        ),
        (
            {"candidates": [{"model": FOREST, "space": {"model.params.max_depth": "randint(5, 2)"}}]},
            r"tune\.candidates\[0\]\.space\.model\.params\.max_depth: randint needs low < high",
        ),
        (
            {"candidates": [{"model": FOREST}, {"model": FOREST}]},
            r"sklearn\.random_forest named twice",
        ),
        ({"candidates": [{"model": {"family": "xgboost"}}]}, r"'xgboost' is not one of torch, sklearn"),
        ({"space": {}}, r"a sweep needs at least one path to tune"),
        (
            {"scheduler": "pbt", "space": {"model.params.dropout": "uniform(0, 0.5)"}},
            r"tune\.space\.model\.params\.dropout: pbt goes on from another trial's checkpoint",
        ),
        (
            {
                "scheduler": "pbt",
                "candidates": [{"model": FOREST, "space": {"model.params.max_depth": "randint(2, 5)"}}],
            },
            r"pbt perturbs a torch model's training values between epochs; a scikit-learn estimator",
        ),
        ({"goal": float("nan")}, r"tune\.goal: .*finite number"),
    ],
)
def test_a_space_that_does_not_fit_is_refused_naming_the_path(tune: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_spec(tuned(**tune))


def test_a_goal_is_met_by_a_metric_at_least_as_good() -> None:
    accuracy = TuneConfig(metric="valid_accuracy", mode="max", goal=0.9)
    loss = TuneConfig(metric="valid_loss", mode="min", goal=0.1)
    assert accuracy.reaches_goal({"valid_accuracy": 0.9}) and not accuracy.reaches_goal(
        {"valid_accuracy": 0.89}
    )
    assert loss.reaches_goal({"valid_loss": 0.05}) and not loss.reaches_goal({"valid_loss": 0.2})
    assert not loss.reaches_goal({"valid_loss": float("nan")}) and not loss.reaches_goal(
        {"valid_accuracy": 0}
    )
    assert not TuneConfig(metric="valid_loss").reaches_goal({"valid_loss": -1e9})  # no goal: never


def test_candidates_of_fixed_models_need_no_space() -> None:
    spec = parse_spec(tuned(candidates=[{"model": FOREST}, {"model": {"family": "sklearn", "name": "knn"}}]))
    assert spec.tune is not None and len(spec.tune.candidates) == 2


def test_a_warm_start_seeds_the_study_with_what_fits_this_space() -> None:
    import optuna

    from raylens.tuning.candidates import WARM_STUDY, EarlierTrial, seeded_study

    config = TuneConfig(
        search="tpe",
        candidates=[
            {"model": FOREST, "space": {"model.params.max_depth": "randint(2, 20)"}},  # widened from 2-9
            {
                "model": {"family": "sklearn", "name": "knn"},
                "space": {"model.params.n_neighbors": "randint(1, 9)"},
            },
        ],
    )
    candidates = candidates_of(config, TorchModelConfig())
    earlier = [
        EarlierTrial("sklearn.random_forest", {"model": {}, "model.params.max_depth": 8}, 0.95),
        EarlierTrial("sklearn.random_forest", {"model": {}, "model.params.max_depth": 40}, 0.93),
        EarlierTrial("sklearn.knn", {"model": {}, "model.params.n_neighbors": 3}, 0.91),
        EarlierTrial("sklearn.svm", {"model": {}, "model.params.C": 1.0}, 0.97),
    ]
    storage, notes = seeded_study(earlier, candidates, "max")
    trials = optuna.load_study(study_name=WARM_STUDY, storage=storage).trials
    assert [t.value for t in trials] == [0.95, 0.93, 0.91]
    assert trials[0].params == {
        "candidate": "sklearn.random_forest",
        "sklearn.random_forest:model.params.max_depth": 8,
    }
    assert trials[1].params == {"candidate": "sklearn.random_forest"}  # its depth is outside: dropped
    assert notes == [
        "warm start: 1 earlier trial(s) of candidates this sweep does not have were left out",
        "warm start: 1 earlier value(s) of model.params.max_depth outside this sweep's space were dropped",
    ]
    with pytest.raises(
        UserError, match=r"tune\.warm_start: earlier trials seed Optuna's searcher; set tune\.search: tpe"
    ):
        parse_spec(tuned(warm_start="abc", space={"train.optimizer.lr": "loguniform(1e-4, 1e-1)"}))


def test_one_listed_candidate_replaces_the_specs_model_in_its_trials() -> None:
    config = TuneConfig(candidates=[{"model": FOREST, "space": {"model.params.max_depth": "randint(2, 9)"}}])
    (forest,) = candidates_of(config, TorchModelConfig())
    values = spec_values({"model.params.max_depth": 3}, [forest])
    assert values == {
        "model": SklearnModelConfig(name="random_forest").model_dump(),
        "model.params.max_depth": 3,
    }
    (spec_model,) = candidates_of(TuneConfig(space={"train.seed": "randint(0, 3)"}), TorchModelConfig())
    assert spec_values({"train.seed": 1}, [spec_model]) == {"train.seed": 1}


def test_fanova_finds_the_value_that_decides_the_metric_and_not_the_one_that_does_not() -> None:
    import numpy as np

    from raylens.tuning.leaderboard import Costs, Row, parameter_importances

    config = TuneConfig(
        space={"train.optimizer.lr": "loguniform(1e-4, 1e-1)", "train.seed": "randint(0, 100)"}
    )
    (candidate,) = candidates_of(config, TorchModelConfig())
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):  # fANOVA's forest needs a few dozen trials to tell noise from effect
        lr, seed = float(10 ** rng.uniform(-4, -1)), int(rng.integers(0, 100))
        loss = (np.log10(lr) + 2.5) ** 2  # best at lr = 3e-3; the seed plays no part
        values = {"train.optimizer.lr": lr, "train.seed": seed}
        rows.append(Row(f"t{i}", candidate.name, float(loss), Costs(1.0), values))
    shares = parameter_importances(rows, [candidate], "min", seed=0)
    assert list(shares) == ["train.optimizer.lr", "train.seed"]  # the largest first
    assert shares["train.optimizer.lr"] > 0.9 and sum(shares.values()) == pytest.approx(1.0)
    assert parameter_importances(rows[:2], [candidate], "min", seed=0) == {}  # too few to tell
