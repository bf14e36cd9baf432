"""Candidates: the models one sweep chooses among, each with its own space (a conditional space).

A sweep over the spec's model alone has one candidate. With ``tune.candidates`` every trial first
draws a candidate (``CANDIDATE``), then the values of that candidate's space: its own paths and
the shared ``train.`` paths of ``tune.space``. A trial's configuration, as Tune holds it, names
each value ``<candidate>:<path>`` (values of different candidates never share a name, so a
searcher models each on its own); ``spec_values`` turns it back into spec paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raylens.errors import UserError
from raylens.trainer import AnyModelConfig, TrainConfig
from raylens.tuning.config import TuneConfig
from raylens.tuning.space import Distribution, parse_space, sample_configs

if TYPE_CHECKING:
    from optuna.trial import Trial

CANDIDATE = "candidate"
"""The key of a trial's configuration that names its candidate."""

SCALARS = (bool, int, float, str, type(None))
"""What an Optuna categorical can hold."""


@dataclass(frozen=True)
class Candidate:
    name: str
    model: AnyModelConfig
    space: dict[str, Distribution]
    """Spec paths to distributions: the candidate's own and the shared ones."""

    def key(self, path: str) -> str:
        return f"{self.name}:{path}"


def candidates_of(config: TuneConfig, model: AnyModelConfig) -> list[Candidate]:
    """The sweep's candidates: ``tune.candidates``, or the spec's model with ``tune.space``."""
    shared = parse_space(config.space)
    if not config.candidates:
        return [Candidate(f"{model.family}.{model.name}", model, shared)]
    per_model = [p for p in shared if not p.startswith("train.")]
    if per_model:
        raise UserError(
            f"tune.space.{per_model[0]}: with tune.candidates, tune.space holds the train. paths every "
            "candidate shares; move model paths into the candidate's own space (tune.candidates[].space)"
        )
    found = []
    for index, candidate in enumerate(config.candidates):
        own = parse_space(candidate.space, where=f"tune.candidates[{index}].space")
        found.append(Candidate(candidate.label, candidate.model, {**shared, **own}))
    return found


def spec_values(config: dict[str, Any], candidates: list[Candidate]) -> dict[str, Any]:
    """A trial's configuration as spec values: with several candidates, ``model`` (the chosen
    candidate's whole section) first, then its sampled paths."""
    if len(candidates) == 1 and CANDIDATE not in config:
        return {path: value for path, value in config.items() if path in candidates[0].space}
    chosen = candidate_named(config, candidates)
    values: dict[str, Any] = {"model": chosen.model.model_dump()}
    for path in chosen.space:
        if chosen.key(path) in config:
            values[path] = config[chosen.key(path)]
    return values


def candidate_named(config: dict[str, Any], candidates: list[Candidate]) -> Candidate:
    if len(candidates) == 1:
        return candidates[0]
    name = config.get(CANDIDATE)
    for candidate in candidates:
        if candidate.name == name:
            return candidate
    raise UserError(f"a trial names candidate {name!r}, which tune.candidates does not hold")


class DefineByRun:
    """The space as Optuna's define-by-run function: a candidate, then its values. A class, not a
    closure: Tune pickles the searcher with the sweep's state, for a resume."""

    def __init__(self, candidates: list[Candidate]) -> None:
        self.candidates = candidates

    def __call__(self, trial: Trial) -> None:
        candidates = self.candidates
        chosen = candidates[0]
        if len(candidates) > 1:
            name = trial.suggest_categorical(CANDIDATE, [c.name for c in candidates])
            chosen = next(c for c in candidates if c.name == name)
        for path, dist in chosen.space.items():
            key = chosen.key(path) if len(candidates) > 1 else path
            if dist.kind == "choice":
                trial.suggest_categorical(key, dist.args[0])
            elif dist.kind == "randint":
                trial.suggest_int(key, dist.args[0], dist.args[1] - 1)
            else:
                trial.suggest_float(key, dist.args[0], dist.args[1], log=dist.kind == "loguniform")


def check_search(config: TuneConfig, candidates: list[Candidate]) -> None:
    """The space fits the searcher: ``UserError`` naming the path and how to write it."""
    if not any(c.space for c in candidates) and len(candidates) == 1:
        raise UserError("tune.space: a sweep needs at least one path to tune, e.g. train.optimizer.lr")
    if config.search == "grid":
        if len(candidates) > 1:
            raise UserError(
                "tune.search: grid covers one model's space; use random or tpe with tune.candidates"
            )
        for path, dist in candidates[0].space.items():
            if dist.kind != "choice":
                raise UserError(
                    f"tune.space.{path}: grid search tries listed values only; write "
                    f"choice([a, b, ...]) instead of {dist.kind}(...)"
                )
    if config.search == "tpe" or len(candidates) > 1:
        for candidate in candidates:
            for path, dist in candidate.space.items():
                if dist.kind == "choice" and not all(isinstance(v, SCALARS) for v in dist.args[0]):
                    raise UserError(
                        f"tune.space.{path}: Optuna (tune.search: tpe, or tune.candidates) chooses among "
                        "numbers, strings, booleans and null, not lists or mappings; tune a number "
                        "instead (e.g. a width, with the list built from it by a model factory), or "
                        "use tune.search: random with one model"
                    )


def sampled_configs(
    config: TuneConfig, model: AnyModelConfig, train: TrainConfig
) -> list[tuple[str, dict[str, Any], AnyModelConfig, TrainConfig]]:
    """A few configurations of every candidate, drawn from its space and validated (no model
    code imported): ``(candidate, values, model, train)``. ``UserError`` for a space that does not
    fit its searcher or values that do not fit the spec."""
    candidates = candidates_of(config, model)
    check_search(config, candidates)
    return [
        (candidate.name, values, sampled_model, sampled_train)
        for candidate in candidates
        for values, sampled_model, sampled_train in sample_configs(
            candidate.space, candidate.model, train, config.seed
        )
    ]
