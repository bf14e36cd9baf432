"""Candidates: the models one sweep chooses among, each with its own space (a conditional space).

A sweep over the spec's model alone has one candidate. With ``tune.candidates`` every trial first
draws a candidate (``CANDIDATE``), then the values of that candidate's space: its own paths and
the shared ``train.`` paths of ``tune.space``. A trial's configuration, as Tune holds it, names
each value ``<candidate>:<path>`` (values of different candidates never share a name, so a
searcher models each on its own); ``spec_values`` turns it back into spec paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raylens.errors import UserError, did_you_mean
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
    listed: bool = True
    """Named in ``tune.candidates`` (its model replaces the spec's), not the spec's model itself."""

    def key(self, path: str) -> str:
        return f"{self.name}:{path}"


def candidates_of(config: TuneConfig, model: AnyModelConfig) -> list[Candidate]:
    """The sweep's candidates: ``tune.candidates``, or the spec's model with ``tune.space``."""
    shared = parse_space(config.space)
    if not config.candidates:
        return [Candidate(f"{model.family}.{model.name}", model, shared, listed=False)]
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
    """A trial's configuration as spec values: for a candidate of ``tune.candidates``, ``model``
    (its whole section) first, then its sampled paths."""
    chosen = candidate_named(config, candidates)
    values: dict[str, Any] = {"model": chosen.model.model_dump()} if chosen.listed else {}
    for path in chosen.space:
        key = chosen.key(path) if len(candidates) > 1 else path
        if key in config:
            values[path] = config[key]
    return values


def candidate_named(config: dict[str, Any], candidates: list[Candidate]) -> Candidate:
    if len(candidates) == 1:
        return candidates[0]
    name = config.get(CANDIDATE)
    for candidate in candidates:
        if candidate.name == name:
            return candidate
    raise UserError(f"a trial names candidate {name!r}, which tune.candidates does not hold")


def _check_pbt(config: TuneConfig, candidates: list[Candidate]) -> None:
    """PBT goes on from another trial's checkpoint with values perturbed: values a checkpoint can
    take (the train. paths), of torch models."""
    if len(candidates) > 1 or candidates[0].model.family != "torch":
        raise UserError(
            "tune.scheduler: pbt perturbs a torch model's training values between epochs; a scikit-learn "
            "estimator or a choice among candidates has none to perturb: use asha, hyperband or median"
        )
    for path in candidates[0].space:
        if not path.startswith("train."):
            raise UserError(
                f"tune.space.{path}: pbt goes on from another trial's checkpoint, whose model must be the "
                "same: tune only train. paths with pbt (e.g. train.optimizer.lr), or use asha"
            )


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
    if config.scheduler == "pbt":
        _check_pbt(config, candidates)
    optuna = config.search == "tpe" or len(candidates) > 1
    if config.objectives and not optuna:
        raise UserError(
            "tune.objectives: a search for several objectives is Optuna's multi-objective TPE; set "
            "tune.search: tpe (random and grid search draw without looking at results)"
        )
    if config.objectives and config.warm_start is not None:
        raise UserError(
            "tune.warm_start: earlier trials seed a search of tune.metric alone; leave out "
            "tune.objectives or tune.warm_start"
        )
    if config.warm_start is not None and not optuna:
        raise UserError(
            "tune.warm_start: earlier trials seed Optuna's searcher; set tune.search: tpe (random and "
            "grid search draw without looking at results)"
        )
    if optuna:
        for candidate in candidates:
            for path, dist in candidate.space.items():
                if dist.kind == "choice" and not all(isinstance(v, SCALARS) for v in dist.args[0]):
                    raise UserError(
                        f"tune.space.{path}: Optuna (tune.search: tpe, or tune.candidates) chooses among "
                        "numbers, strings, booleans and null, not lists or mappings; tune a number "
                        "instead (e.g. a width, with the list built from it by a model factory), or "
                        "use tune.search: random with one model"
                    )


TRIAL_COSTS = ("time_total_s", "train_rss_mb")
"""What every trial reports beside the loop's metrics: its training time (Tune's) and memory."""


def check_objectives(config: TuneConfig, task: str | None, num_classes: int | None) -> None:
    """Every objective is a metric trials of ``task`` report (either task's when None): said
    before any trial starts, as Tune's own check would fail the sweep at the first report."""
    from raylens.trainer.metrics import reported_metrics

    tasks = [task] if task else ["classification", "regression"]
    known = [*dict.fromkeys(n for each in tasks for n in reported_metrics(each, num_classes)), *TRIAL_COSTS]
    for objective in config.objectives:
        if objective.metric not in known:
            raise UserError(
                f"tune.objectives: '{objective.metric}' is not a metric trials report"
                f"{did_you_mean(objective.metric, known)}; use one of {', '.join(known)}"
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


@dataclass(frozen=True)
class EarlierTrial:
    """A finished trial of an earlier sweep, as its leaderboard keeps it: a warm start's seed."""

    candidate: str
    values: dict[str, Any]
    """Its values as spec paths (with several candidates, ``model`` too, which is not searched)."""
    score: float


WARM_STUDY = "raylens-warm-start"


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs a line per trial and per study at INFO to its own handler: warnings only
    inside, its verbosity put back after (it is the process's setting)."""
    try:
        import optuna
    except ImportError:
        yield
        return
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def seeded_study(
    earlier: list[EarlierTrial], candidates: list[Candidate], mode: str
) -> tuple[Any, list[str]]:
    """Optuna storage holding study ``WARM_STUDY``, whose finished trials are ``earlier`` in this
    sweep's space, for TPE to model from its first trial; and notes on what was dropped: trials
    of a candidate this sweep does not have, and values outside the space (a value inside a
    widened space is kept)."""
    import optuna

    storage = optuna.storages.InMemoryStorage()
    with quiet_optuna():
        study = optuna.create_study(
            storage=storage, study_name=WARM_STUDY, direction="minimize" if mode == "min" else "maximize"
        )
    notes: list[str] = []
    dropped_values: dict[str, int] = {}
    absent = 0
    for trial in earlier:
        chosen = next((c for c in candidates if c.name == trial.candidate), None)
        if chosen is None:
            absent += 1
            continue
        params: dict[str, Any] = {}
        distributions: dict[str, Any] = {}
        if len(candidates) > 1:
            params[CANDIDATE] = chosen.name
            distributions[CANDIDATE] = optuna.distributions.CategoricalDistribution(
                [c.name for c in candidates]
            )
        for path, dist in chosen.space.items():
            if path not in trial.values:
                continue
            key = chosen.key(path) if len(candidates) > 1 else path
            value = trial.values[path]
            if not within(dist, value):
                dropped_values[path] = dropped_values.get(path, 0) + 1
                continue
            params[key], distributions[key] = value, optuna_distribution(dist)
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=distributions, value=trial.score)
        )
    if absent:
        notes.append(
            f"warm start: {absent} earlier trial(s) of candidates this sweep does not have were left out"
        )
    for path, count in sorted(dropped_values.items()):
        notes.append(
            f"warm start: {count} earlier value(s) of {path} outside this sweep's space were dropped"
        )
    return storage, notes


def within(dist: Distribution, value: Any) -> bool:
    """Whether ``dist`` can draw ``value``."""
    if dist.kind == "choice":
        return any(value == v and type(value) is type(v) for v in dist.args[0])
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    low, high = dist.args
    if dist.kind == "randint":
        return isinstance(value, int) and low <= value < high
    return bool(low <= value <= high)


def optuna_distribution(dist: Distribution) -> Any:
    import optuna.distributions as od

    if dist.kind == "choice":
        return od.CategoricalDistribution(dist.args[0])
    if dist.kind == "randint":
        return od.IntDistribution(dist.args[0], dist.args[1] - 1)
    return od.FloatDistribution(dist.args[0], dist.args[1], log=dist.kind == "loguniform")
