"""Model families: what raylens asks of a kind of model, so that the tracked run, the sweep and
the registered model never ask which kind it is.

A family checks a model section's parameters, trains a job (the final training, and a sweep's
trial), turns what it trained into a ``Predictor``, and writes and reads the files of its
registered model. ``torch`` (``raylens.trainer.torch_family``) trains PyTorch modules with the
plain loop under Ray Train; ``sklearn`` (``raylens.trainer.sklearn_family``) fits scikit-learn
estimators in one process. ``family_of(config)`` is the registry; both are imported on first use.

The registered model loads its family through this module: it stays free of Ray and MLflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from raylens.errors import UserError
from raylens.trainer.config import FAMILIES, AnyModelConfig, TrainConfig
from raylens.trainer.task import TaskSpec, task_spec

if TYPE_CHECKING:
    from raylens.features import FeatureSet, SplitArrays
    from raylens.storage import Location


@dataclass(frozen=True)
class TrainJob:
    """What every worker of one run trains, whatever the family: model, hyperparameters, task."""

    model: AnyModelConfig
    train: TrainConfig
    task: TaskSpec
    in_features: int

    @classmethod
    def for_feature_set(cls, model: AnyModelConfig, train: TrainConfig, feature_set: FeatureSet) -> TrainJob:
        task = task_spec(feature_set, train.class_weights)
        return cls(model, train, task, len(feature_set.feature_columns))


class TrainingFailed(UserError):
    """A run a monitor failed (a diverged loss): the message says why and what to try."""


class StoppedByRule(Exception):
    """A debugger rule with action ``stop`` ended a sweep's trial: the sweep counts it stopped,
    not failed, and goes on."""


def stopped_by_rule(error: str) -> str | None:
    """The finding that stopped a trial, from the text of its error (a ``StoppedByRule`` Tune
    kept), or None when the error is another."""
    marker = StoppedByRule.__name__ + ": "
    for line in reversed(error.splitlines()):
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None


class Predictor(Protocol):
    """A trained model on feature rows as the feature pipeline writes them (float32)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices for classification, values in the target's units for regression."""
        ...

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities, one column per class of the feature set, each row summing to 1."""
        ...


@dataclass(frozen=True)
class Trained:
    """What a family's training hands back: the model, its reports, where its state lies."""

    predictor: Predictor
    history: list[dict[str, float]]
    checkpoint_dir: Path
    """The folder of the final (or chosen best) state, as the family writes it."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags the run gets about the model chosen (e.g. the epoch of the best checkpoint)."""


@dataclass(frozen=True)
class ModelFiles:
    """A family's files of a registered model, and what makes two models the same."""

    files: dict[str, str]
    """Artifact name → file path, as ``mlflow.pyfunc.log_model(artifacts=...)`` takes them."""
    content: bytes
    """The fitted state as bytes (weights, an estimator's arrays): two equal models, equal bytes."""
    code: list[str]
    """Code the model needs besides raylens: a user factory's module, say."""


TrialReport = Callable[[dict[str, float], "Path | None"], None]
"""How a trial reports one epoch to the sweep: its metrics and a folder holding the state to go
on from (``None``: nothing to resume from)."""


class ModelFamily(Protocol):
    name: str

    def check_params(self, config: AnyModelConfig) -> None:
        """``UserError`` naming the parameter when ``config.params`` does not fit the model."""
        ...

    def check_on_rows(self, config: AnyModelConfig, rows: np.ndarray, task: str, num_outputs: int) -> None:
        """``UserError`` naming the parameter when the model cannot be built for ``task``
        (classification, regression) or run on a few real feature rows: before any worker starts."""
        ...

    def layout(self, job: TrainJob, *, embedded: bool) -> tuple[TrainJob, str]:
        """The job as it will train (``embedded``: on this machine alone), and how it is laid
        out on workers and why (the run's ``raylens.parallel`` tag)."""
        ...

    def train(
        self,
        job: TrainJob,
        feature_set: FeatureSet,
        *,
        run_name: str,
        storage_path: Location,
        on_epoch: Callable[[dict[str, float]], None],
        on_notice: Callable[[str], None],
        embedded: bool,
    ) -> Trained:
        """The final training: resumable where the family keeps checkpoints."""
        ...

    def run_trial(
        self,
        job: TrainJob,
        train: SplitArrays,
        valid: SplitArrays,
        report: TrialReport,
        resume_from: Path | None,
    ) -> None:
        """One sweep trial in this process, each epoch reported; ``TrainingFailed`` when a
        monitor fails it."""
        ...

    def trial_predictor(self, job: TrainJob, checkpoint: Path) -> Predictor:
        """The model a trial's checkpoint (``run_trial``'s report folder) holds."""
        ...

    def model_files(self, trained: Trained, config: AnyModelConfig, folder: Path) -> ModelFiles:
        """Write the registered model's files of ``trained`` into ``folder``."""
        ...

    def load_predictor(
        self, artifacts: Mapping[str, str], config: AnyModelConfig, task: TaskSpec, in_features: int
    ) -> Predictor:
        """The predictor a registered model's files hold (``model_files``' artifacts)."""
        ...


_MODULES = {"torch": "raylens.trainer.torch_family", "sklearn": "raylens.trainer.sklearn_family"}
assert set(_MODULES) == set(FAMILIES)


def import_named(path: str) -> Any:
    """The attribute a user's "package.module:attr" names (None if the module lacks it);
    ``UserError`` naming ``model.name`` when the module cannot be imported."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"model.name: cannot import '{module_name}' ({exc}); make it importable "
            "(install it, or run from the folder that holds it)"
        ) from None
    return getattr(module, attr, None)


def user_code(path: str) -> list[str]:
    """The module or package of a user's "package.module:attr", for the model to carry — unless it
    is installed (in site-packages), where it belongs in the environment, not in the model."""
    module = importlib.import_module(path.partition(":")[0].split(".")[0])
    source = Path(module.__file__ or "")
    if not module.__file__ or "site-packages" in source.parts:
        return []
    return [str(source.parent if source.name == "__init__.py" else source)]


def family_of(config: AnyModelConfig | str) -> ModelFamily:
    """The family of a model section (or named): imported on first use, so naming a family
    imports only its own framework."""
    name = config if isinstance(config, str) else config.family
    family: ModelFamily = importlib.import_module(_MODULES[name]).FAMILY
    return family
