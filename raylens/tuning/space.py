"""Search spaces: distributions over dotted spec paths, applied to the model and train configs.

A space maps a path (``train.optimizer.lr``, ``model.params.hidden``) to a distribution written as
``uniform(low, high)``, ``loguniform(low, high)``, ``randint(low, high)`` (high excluded) or
``choice([a, b, ...])``. Paths under ``model.`` and ``train.`` can be tuned.
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from raylens.errors import UserError
from raylens.trainer import AnyModelConfig, TrainConfig, parse_model_config
from raylens.trainer.config import FAMILIES

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
TUNABLE_ROOTS = ("model", "train")
FIXED_PATHS = {
    "train.class_weights": "class weights are fixed for a sweep (set train.class_weights); a sweep "
    "compares trials by one loss, which the weights change",
}
"""Paths of the train section a sweep cannot vary, and why."""


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple[Any, ...]

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args[0]))
        return getattr(tune, self.kind)(*self.args)

    def sample(self, rng: random.Random) -> Any:
        """A value drawn without Ray, for checking the space at load time."""
        if self.kind == "choice":
            return rng.choice(list(self.args[0]))
        low, high = self.args
        if self.kind == "randint":
            return rng.randrange(low, high)
        return rng.uniform(low, high)


def parse_distribution(path: str, text: str, section: str = "tune.space") -> Distribution:
    where = f"{section}.{path}"
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise UserError(
            f"{where}: '{text}' is not a distribution; write one of "
            "uniform(low, high), loguniform(low, high), randint(low, high), choice([a, b])"
        )
    kind = call.func.id
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution '{kind}'; use one of {', '.join(DISTRIBUTIONS)}")
    try:
        args = tuple(ast.literal_eval(arg) for arg in call.args)
    except ValueError:
        raise UserError(f"{where}: the arguments of '{text}' must be literal numbers or lists") from None
    if kind == "choice":
        if len(args) == 1 and isinstance(args[0], list | tuple):
            args = (list(args[0]),)
        else:
            args = (list(args),)
        if not args[0]:
            raise UserError(f"{where}: choice() needs at least one value")
        return Distribution(kind, args)
    if len(args) != 2 or not all(isinstance(a, int | float) for a in args):
        raise UserError(f"{where}: {kind} takes two numbers (low, high), got '{text}'")
    low, high = args
    if not low < high:
        raise UserError(f"{where}: {kind} needs low < high, got {low} and {high}")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise UserError(f"{where}: randint takes whole numbers, got '{text}'")
    return Distribution(kind, (low, high))


def parse_space(space: dict[str, str], where: str = "tune.space") -> dict[str, Distribution]:
    """The distributions of a space section (``where`` names it in errors)."""
    parsed = {}
    for path, text in space.items():
        root = path.split(".", 1)[0]
        if root not in TUNABLE_ROOTS or "." not in path:
            raise UserError(
                f"{where}.{path}: only paths under model. and train. can be tuned "
                "(e.g. train.optimizer.lr, model.params.hidden)"
            )
        if path in FIXED_PATHS:
            raise UserError(f"{where}.{path}: {FIXED_PATHS[path]}")
        parsed[path] = parse_distribution(path, text, where)
    return parsed


def with_overrides(
    model: AnyModelConfig, train: TrainConfig, overrides: dict[str, Any]
) -> tuple[AnyModelConfig, TrainConfig]:
    """New configs with each dotted path set to its value, validated again."""
    trees = {"model": model.model_dump(), "train": train.model_dump()}
    for path, value in overrides.items():
        root, *keys = path.split(".")
        if not keys:  # a whole section (a candidate's model)
            trees[root] = dict(value)
            continue
        node = trees[root]
        for key in keys[:-1]:
            child = node.get(key)
            if child is None and root == "model" and key == "params":
                child = node[key] = {}
            if not isinstance(child, dict):
                raise UserError(f"tune.space.{path}: '{key}' is not a section of the spec")
            node = child
        node[keys[-1]] = value
    try:
        return parse_model_config(trees["model"]), TrainConfig(**trees["train"])
    except ValidationError as exc:
        error = exc.errors()[0]
        root = "train" if exc.title == TrainConfig.__name__ else "model"
        where = ".".join([root, *(str(p) for p in error["loc"] if p not in FAMILIES)])
        raise UserError(
            f"tune.space: a value sampled for {where} does not fit: "
            f"{error['msg']} (got {error.get('input')!r})"
        ) from None


def sample_configs(
    space: dict[str, Distribution], model: AnyModelConfig, train: TrainConfig, seed: int = 0, count: int = 3
) -> list[tuple[dict[str, Any], AnyModelConfig, TrainConfig]]:
    """A few configurations drawn from the space (without Ray), validated: for checks at load."""
    rng = random.Random(seed)
    drawn = []
    for _ in range(count):
        values = {path: dist.sample(rng) for path, dist in space.items()}
        drawn.append((values, *with_overrides(model, train, values)))
    return drawn


def check_space(
    space: dict[str, Distribution], model: AnyModelConfig, train: TrainConfig, seed: int = 0
) -> None:
    """Draw from every distribution a few times and validate the configs they make, the model's
    parameters against its constructor (which imports the model's code, and so torch)."""
    from raylens.trainer.family import family_of

    for _, sampled_model, _ in sample_configs(space, model, train, seed):
        family_of(sampled_model).check_params(sampled_model)
