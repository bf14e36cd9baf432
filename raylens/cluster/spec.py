"""The experiment spec: YAML in, typed and validated models out, once, at the edge.

Every error names the key's path and what would be valid, e.g.
``train.scaling.strategy: 'dpp' is not one of ddp, fsdp, pipeline, auto``.

Reading and validating a spec imports pydantic and YAML only (the packages' exports are lazy):
a mistake in the spec is answered before torch, Ray or MLflow would take seconds to import.
What needs the model's code — its parameters against its constructor — is ``check_model_params``.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raylens.cluster.release_config import ContinuousTrainingConfig, ReleaseConfig, ServeConfig
from raylens.errors import UserError, did_you_mean
from raylens.features import DataConfig, FeaturesConfig
from raylens.trainer import ModelConfig, SklearnModelConfig, TorchModelConfig, TrainConfig
from raylens.trainer.config import FAMILIES
from raylens.tuning import TuneConfig, candidates_of, check_space, sampled_configs


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    uri: str = "default"
    """An MLflow tracking URI (sqlite:///abs/path.db, http://host:5000, ...); "default" is
    MLFLOW_TRACKING_URI when that is set, else a SQLite database in the run folder."""
    experiment: str | None = None
    """MLflow experiment name; defaults to the spec's name."""
    register_as: str | None = None
    """Registered model name for the final model; unset: the model is logged, not registered."""


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Names the feature set, the MLflow experiment and the run folders."""
    data: DataConfig
    """Where the rows come from, the target, the split (raylens/features/config.py)."""
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    """The feature pipeline's transforms."""
    model: ModelConfig = Field(default_factory=TorchModelConfig)
    """The model family, architecture and its parameters (raylens/trainer/config.py)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The final training: epochs, batch size, optimizer, scaling, checkpoints."""
    tune: TuneConfig | None = None
    """A sweep before the final training (raylens/tuning/config.py); none: train as written."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Where MLflow records go and the registered model's name."""
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)
    """`raylens pipeline`'s quality gate and approval (raylens/cluster/release_config.py)."""
    serve: ServeConfig = Field(default_factory=ServeConfig)
    """The Ray Serve endpoint of `raylens serve` and of the pipeline's staging check."""
    ct: ContinuousTrainingConfig = Field(default_factory=ContinuousTrainingConfig)
    """`raylens ct check`: the drift and growth that call for training again."""

    @model_validator(mode="after")
    def _one_process_for_sklearn(self) -> ExperimentSpec:
        if self.model.family != "sklearn":
            return self
        scaling = self.train.scaling
        if scaling.max_workers > 1 or scaling.use_gpu or scaling.strategy not in ("auto",):
            raise ValueError(
                "model.family sklearn: a scikit-learn estimator fits in one process on CPUs; remove "
                "train.scaling.workers, strategy and use_gpu (give it threads with cpus_per_worker)"
            )
        if self.train.data != "memory":
            raise ValueError(
                "model.family sklearn: a scikit-learn estimator fits on the whole split in memory; "
                "remove train.data (ray_data streams batches to torch models)"
            )
        return self

    @model_validator(mode="after")
    def _one_process_per_sklearn_trial(self) -> ExperimentSpec:
        models = [self.model, *(c.model for c in self.tune.candidates)] if self.tune is not None else []
        sklearn = any(model.family == "sklearn" for model in models)
        if sklearn and self.tune is not None and self.tune.workers_per_trial > 1:
            raise ValueError(
                "model.family sklearn: a trial fits one estimator in one process; set "
                "tune.workers_per_trial to 1 (give it threads with tune.cpus_per_trial)"
            )
        return self


def load_spec(path: Path, overrides: Sequence[str] = ()) -> ExperimentSpec:
    """Read and validate a spec file, with ``--set KEY=VALUE`` overrides applied; ``UserError``
    lists every problem with its key path."""
    return parse_spec(read_spec(path, overrides), source=spec_source(path, overrides))


def spec_source(path: Path, overrides: Sequence[str] = ()) -> str:
    """How errors name a spec: its file, and the overrides given with it."""
    return str(path) + "".join(f" --set {item}" for item in overrides)


def read_spec(path: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The spec file as a mapping, ``overrides`` applied, not validated yet."""
    if not path.is_file():
        raise UserError(f"spec file '{path}' does not exist; pass the path of an experiment YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: an experiment spec is a mapping with keys name, data, model, train, ...")
    return apply_overrides(raw, overrides)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``KEY=VALUE`` set: the key a dotted path (``train.epochs``), the
    value read as YAML (``5``, ``[64, 32]``, ``adam``). Keys under ``tune.space.`` are spec paths
    themselves: ``tune.space.train.optimizer.lr=loguniform(1e-4, 1e-2)`` sets one entry."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip(" ."):
            raise UserError(f"--set '{item}': write KEY=VALUE with a dotted key, e.g. --set train.epochs=5")
        try:
            values[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key}: the value '{text}' is not valid YAML ({exc})") from None
    return with_values(raw, values, origin="--set ")


def with_values(raw: Mapping[str, Any], values: Mapping[str, Any], origin: str = "") -> dict[str, Any]:
    """A copy of ``raw`` with each dotted path of ``values`` set, sections made as needed."""
    spec = copy.deepcopy(dict(raw))
    for key, value in values.items():
        path = [part for part in key.split(".") if part]
        if path[:2] == ["tune", "space"] and len(path) > 2:
            path = [*path[:2], ".".join(path[2:])]
        node = spec
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise UserError(f"{origin}{key}: '{where}' is a value ({child!r}), not a section with keys")
            node = child
        node[path[-1]] = value
    return spec


def best_spec(raw: Mapping[str, Any], best_config: Mapping[str, Any]) -> dict[str, Any]:
    """The spec a sweep hands to ``raylens train``: its best configuration written in, the tune
    section left out."""
    spec = with_values(raw, best_config)
    spec.pop("tune", None)
    return spec


def parse_spec(raw: Mapping[str, Any], source: str = "spec") -> ExperimentSpec:
    """Validate a spec mapping (what ``Experiment.from_dict`` takes): the schema, the search
    space's syntax and the configurations it samples. Imports no model code."""
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(error, dict(raw)) for error in exc.errors()]
        raise UserError(f"{source} is not a valid experiment spec:\n  " + "\n  ".join(lines)) from None
    if spec.tune is not None:
        sampled_configs(spec.tune, spec.model, spec.train)
    return spec


def check_model_params(spec: ExperimentSpec) -> None:
    """The model's parameters, and those of every configuration the sweep may sample, against the
    model's constructor: imports the model's code (and torch), so it is not part of parsing."""
    from raylens.trainer.family import family_of

    family_of(spec.model).check_params(spec.model)
    if spec.tune is not None:
        for candidate in candidates_of(spec.tune, spec.model):
            check_space(candidate.space, candidate.model, spec.train, spec.tune.seed)


def _describe(error: Any, raw: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    # Pydantic names the union member or list index in the path; keep only the user's keys.
    loc = [p for p in loc if not p.endswith("Step") and p not in ("TuneConfig",)]
    loc = _without_family_tags(loc)
    where = ".".join(loc) or "spec"
    kind, value = error["type"], error.get("input")
    if kind == "model_family":
        family = value.get("family") if isinstance(value, dict) else value
        return (
            f"{where}.family: {family!r} is not one of {', '.join(FAMILIES)}"
            f"{did_you_mean(str(family), FAMILIES)}"
        )
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        hint = did_you_mean(loc[-1], valid)
        return f"{where}: unknown key '{loc[-1]}'{hint}; valid keys here: {', '.join(valid)}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind in ("literal_error", "enum"):
        options = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
        return f"{where}: {value!r} is not one of {', '.join(options)}{did_you_mean(str(value), options)}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{where}: {message}{shown}"


def _without_family_tags(loc: list[str]) -> list[str]:
    """``model.sklearn.params`` → ``model.params``: pydantic names the family a model section was
    validated as (its tag) after the section's key."""
    return [p for i, p in enumerate(loc) if not (p in FAMILIES and i > 0 and loc[i - 1] == "model")]


def _valid_keys(loc: list[str]) -> list[str]:
    model: Any = ExperimentSpec
    for key in loc:
        if key.isdigit():  # an item of a list: its type was taken at the list's key
            continue
        if key == "model" and model is ExperimentSpec:
            # Every family's keys (their families share family, name and params today).
            model = TorchModelConfig
            continue
        field = (
            model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields) if model is not None else []


def spec_reference() -> str:
    """Every key of the spec with its type, default and meaning, made from the typed configs (so it
    cannot drift from what is validated), and the metric names a sweep can optimize per task."""
    from raylens.trainer.metrics import reported_metrics

    lines = [
        "# The experiment spec",
        "",
        "Generated by `raylens spec` from raylens' typed configs; `make test` fails when it is stale.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    lines += _reference_rows(ExperimentSpec, "")
    lines += ["", "## Metrics (`tune.metric`)", ""]
    for task in ("classification", "regression"):
        lines.append(f"- {task}: " + ", ".join(f"`{name}`" for name in reported_metrics(task)))
    binary = [
        name
        for name in reported_metrics("classification", 2)
        if name not in reported_metrics("classification")
    ]
    lines.append(
        "- classification with two classes, also: "
        + ", ".join(f"`{name}`" for name in binary)
        + " (of the second of the sorted classes)"
    )
    return "\n".join(lines) + "\n"


def _reference_rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        families = _family_configs(field.annotation)
        if families:
            rows.append(f"| `{key}` | section | | {_cell(field.description)} |")
            for family in families:
                # Each family's keys, their meaning saying which family they describe.
                said = f"({_family_name(family)}) "
                rows += [
                    row[: row.rindex("| ", 0, -2) + 2] + said + row[row.rindex("| ", 0, -2) + 2 :]
                    for row in _reference_rows(family, f"{key}.")
                ]
            continue
        listed = getattr(field.annotation, "__origin__", None) is list
        steps = _list_item_models(field.annotation) if listed else []
        if len(steps) > 1:  # a list of steps of several kinds (the transforms): each kind's keys
            rows.append(f"| `{key}` | list of sections, one key each | | {_cell(field.description)} |")
            for step in steps:
                rows += _reference_rows(step, f"{key}[].")
            continue
        nested = _config_model(field.annotation)
        if nested is not None:
            kind = "list of sections" if listed else "section"
            rows.append(f"| `{key}` | {kind} | | {_cell(field.description)} |")
            rows += _reference_rows(nested, f"{key}[]." if listed else f"{key}.")
            continue
        default = (
            "required" if field.is_required() else _cell(repr(field.get_default(call_default_factory=True)))
        )
        rows.append(
            f"| `{key}` | {_cell(_type_name(field.annotation))} | {default} | {_cell(field.description)} |"
        )
    return rows


def _family_configs(annotation: Any) -> list[type[BaseModel]]:
    """The configs of a section chosen by a ``family`` key (the model section), else none."""
    members = [typing.get_args(a)[0] if typing.get_args(a) else a for a in typing.get_args(annotation)]
    return [m for m in (TorchModelConfig, SklearnModelConfig) if m in members]


def _family_name(config: type[BaseModel]) -> str:
    return str(config.model_fields["family"].default)


def _list_item_models(annotation: Any) -> list[type[BaseModel]]:
    """The configs a list's items may be (several where the item type is a union of them)."""
    (item,) = typing.get_args(annotation) or (None,)
    members = typing.get_args(item) or (item,)
    return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]


def _config_model(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")
