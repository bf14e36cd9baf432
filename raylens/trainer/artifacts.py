"""The model artifact: an MLflow pyfunc model that takes the raw feature columns a user has.

It holds the trained weights, the model's constructor and the fitted feature transforms, so the
transform a served model applies is the one fitted at training time, byte for byte. The raylens
package travels inside the model (MLflow ``code_paths``), so loading it needs only the pinned
distributions of ``pip_requirements()``: it installs where raylens itself does not.

Loading the model imports this module (the pickled ``TabularTorchModel`` refers to it), so it and
its imports stay free of Ray, the CLI and plotting: what the training side needs is imported
inside ``log_model`` or only for type checking.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

import raylens
from raylens.features import FeatureSet, apply_all, invert_all, transforms_from_dicts
from raylens.trainer.config import ModelConfig
from raylens.trainer.loop import predict, predict_proba
from raylens.trainer.models import build_model
from raylens.trainer.task import TaskSpec

if TYPE_CHECKING:
    from raylens.trainer.job import TrainJob
    from raylens.trainer.tracking import MlflowTracker

WEIGHTS = "weights"
SPEC = "spec"

LOADER_DISTRIBUTIONS = (
    "mlflow",
    "cloudpickle",  # unpickles the python_model; pickles are only safe across the same version
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "pydantic",
)
"""What loading the model imports from an index: MLflow's loader, then the import chain of this
module (raylens.features and raylens.trainer). raylens itself ships with the model."""

OUTPUTS = ("labels", "probabilities")
"""What ``predict`` returns, chosen with ``params={"output": ...}`` (declared in the signature, so
a served model takes it too): class labels (for a regression, values in the target's units), or a
classification model's class probabilities."""

SHOWN_ROWS = 5
"""Rows an error lists per column: enough to find the rows, short enough to read."""


def write_model_files(
    folder: Path,
    model_state: dict[str, torch.Tensor],
    model_config: ModelConfig,
    task: TaskSpec,
    feature_set: FeatureSet,
    *,
    registered_name: str | None = None,
) -> dict[str, str]:
    """Write the weights and everything needed to rebuild the model; return pyfunc artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model_state, folder / "weights.pt")
    spec = {
        "model": model_config.model_dump(),
        "task": asdict(task),
        "feature_columns": feature_set.feature_columns,
        "classes": feature_set.classes,
        "transforms": feature_set.manifest["transforms"],
        "feature_set": {"name": feature_set.name, "version": feature_set.version},
        "registered_name": registered_name,
    }
    (folder / "model_spec.json").write_text(json.dumps(spec, indent=2))
    return {WEIGHTS: str(folder / "weights.pt"), SPEC: str(folder / "model_spec.json")}


class TabularTorchModel(PythonModel):
    """Raw feature columns in, predictions out: class labels, or values in the target's units.

    A classifier called with ``params={"output": "probabilities"}`` returns a DataFrame with one
    float column per class, named ``str(label)`` in the order of the feature set's classes, each
    row the softmax of the network's logits (summing to 1).

    Rows with a value that is not a finite number are refused with an error naming the columns and
    rows, never predicted: the network would turn them into a confident wrong answer.
    """

    def load_context(self, context: PythonModelContext) -> None:
        spec = json.loads(Path(context.artifacts[SPEC]).read_text())
        self.feature_columns: list[str] = spec["feature_columns"]
        self.classes: list[Any] | None = spec["classes"]
        self.task = TaskSpec(**spec["task"])
        self.transforms = transforms_from_dicts(spec["transforms"])
        name = spec.get("registered_name")  # absent in models logged before it was recorded
        self.label = f"models:/{name}" if name else "the model"
        model = build_model(ModelConfig(**spec["model"]), len(self.feature_columns), self.task.out_features)
        model.load_state_dict(torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True))
        self.model = model.eval()

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray | pd.DataFrame:
        output = self._output(params)  # before the rows are read: a wrong param is said first
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        raw = feature_matrix(frame, self.feature_columns, self.label)
        x = torch.from_numpy(apply_all(self.transforms, raw, self.feature_columns))
        if output == "probabilities":
            columns = [str(label) for label in self.classes or []]
            return pd.DataFrame(predict_proba(self.model, x, self.task), columns=columns, index=frame.index)
        predicted = predict(self.model, x, self.task)
        if self.classes is not None:
            return np.asarray(self.classes)[predicted]
        return predicted

    def _output(self, params: dict[str, Any] | None) -> str:
        output = (params or {}).get("output", OUTPUTS[0])
        if output not in OUTPUTS:
            raise MlflowException(
                f"params.output: {output!r} is not an output of {self.label}; "
                f"use one of {', '.join(repr(o) for o in OUTPUTS)}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        if output == "probabilities" and self.classes is None:
            raise MlflowException(
                f"params.output: 'probabilities' needs a classification model, and {self.label} is a "
                "regression predicting values in the target's units; leave out params.output",
                error_code=INVALID_PARAMETER_VALUE,
            )
        return str(output)


def feature_matrix(frame: pd.DataFrame, feature_columns: list[str], label: str) -> np.ndarray:
    """The feature columns of ``frame`` as float32 (the training dtype), or an ``MlflowException``
    (HTTP 400 when served) naming each missing column, or each column holding NaN, inf, -inf, a
    value that is not a number or one beyond float32's range, with its first rows (the frame's
    index labels: positions for a request, the file's row numbers for ``raylens predict``)."""
    missing = [c for c in feature_columns if c not in frame.columns]
    if missing:
        raise MlflowException(
            f"input is missing feature columns {', '.join(repr(c) for c in missing)}; {label} takes "
            f"{len(feature_columns)} columns: {', '.join(repr(c) for c in feature_columns[:10])}"
            f"{', ...' if len(feature_columns) > 10 else ''}",
            error_code=INVALID_PARAMETER_VALUE,
        )
    block = frame[feature_columns]
    with np.errstate(over="ignore"):  # a finite value beyond float32's range becomes inf: reported
        try:
            x = block.to_numpy(dtype=np.float32, na_value=np.nan)
        except (TypeError, ValueError):
            # Strings among object columns (what MLflow lets through for boolean and Any columns)
            # fail the cast as a whole; converted value by value, each is reported where it is.
            x = np.column_stack([_as_float64(block[c]) for c in feature_columns]).astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        problems = [
            _describe(name, kind, np.asarray(frame.index)[np.flatnonzero(rows)])
            for i, name in enumerate(feature_columns)
            if bad[:, i].any()
            for kind, rows in _kinds(block[name], x[:, i]).items()
            if rows.any()
        ]
        raise MlflowException(
            f"input has values that are not finite numbers: {', '.join(problems)}; "
            f"{label} takes finite numbers in every feature column",
            error_code=INVALID_PARAMETER_VALUE,
        )
    return x


def _as_float64(column: pd.Series) -> np.ndarray:
    if not pd.api.types.is_numeric_dtype(column.dtype):
        column = pd.to_numeric(column, errors="coerce")  # None and NaN stay NaN, strings become NaN
    return column.to_numpy(dtype=np.float64, na_value=np.nan)


def _kinds(column: pd.Series, as_float32: np.ndarray) -> dict[str, np.ndarray]:
    """Which rows of one column are bad, by the kind of value a user would look for."""
    absent = column.isna().to_numpy()
    values = _as_float64(column)
    return {
        "NaN": absent,
        "not a number": np.isnan(values) & ~absent,
        "inf": values == np.inf,
        "-inf": values == -np.inf,
        "beyond float32 range": np.isfinite(values) & ~np.isfinite(as_float32),
    }


def _describe(column: str, kind: str, rows: np.ndarray) -> str:
    shown = ", ".join(str(r) for r in rows[:SHOWN_ROWS])
    more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
    return f"column {column!r} {'rows' if len(rows) > 1 else 'row'} [{shown}]{more} ({kind})"


def pip_requirements() -> list[str]:
    """``name==version`` for each of ``LOADER_DISTRIBUTIONS`` as installed now. A local build tag
    (torch's ``+cpu``) is dropped: indexes serve builds under the public version."""
    from importlib.metadata import version

    from packaging.version import Version

    return [f"{name}=={Version(version(name)).public}" for name in LOADER_DISTRIBUTIONS]


def code_to_ship(config: ModelConfig) -> list[str]:
    """The code the model needs besides its requirements: the raylens package and, for a user
    factory ("my_models:build"), the module or package that defines it — unless it is installed
    (in site-packages), where it belongs in the environment, not in the model."""
    shipped = [str(Path(raylens.__file__).parent)]
    if ":" in config.name:
        module = importlib.import_module(config.name.partition(":")[0].split(".")[0])
        source = Path(module.__file__ or "")
        if module.__file__ and "site-packages" not in source.parts:
            shipped.append(str(source.parent if source.name == "__init__.py" else source))
    return shipped


def log_model(
    tracker: MlflowTracker,
    run_id: str,
    model: torch.nn.Module,
    job: TrainJob,
    feature_set: FeatureSet,
    x_test: np.ndarray,
    register_as: str | None,
    lineage: Mapping[str, str],
    headline: Mapping[str, float] | None = None,
) -> LoggedModel:
    """Log ``model`` as a pyfunc model of run ``run_id`` and register it as ``register_as``.

    A version carries a description and tags (the model's digest, feature-set version, lineage,
    ``headline`` metrics). A model identical to a registered version — same weights, model,
    task and feature-set version — is logged with its run but not registered again: the
    existing version is returned."""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    columns = feature_set.feature_columns
    transforms = transforms_from_dicts(feature_set.manifest["transforms"])
    sample = x_test[:5] if len(x_test) else feature_set.read("train").x[:5]
    # The signature takes the columns with the types the user's raw data has (from the manifest).
    raw_types = {c: pa.type_for_alias(feature_set.manifest["schema"][c]).to_pandas_dtype() for c in columns}
    example = pd.DataFrame(invert_all(transforms, sample, columns), columns=columns)
    whole = [c for c, t in raw_types.items() if not np.issubdtype(t, np.floating)]
    example[whole] = example[whole].round()  # undo float error before casting back to int/bool
    example = example.astype(raw_types)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_model_files(
            Path(tmp), model.state_dict(), job.model, job.task, feature_set, registered_name=register_as
        )
        loaded = TabularTorchModel()
        context = PythonModelContext(artifacts=artifacts, model_config={})
        loaded.load_context(context)
        with warnings.catch_warnings():
            # MLflow's hint that integer columns cannot hold missing values: the served model
            # refuses such rows with the column named, which is what it should do.
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
            signature = infer_signature(
                example, loaded.predict(context, example), params={"output": OUTPUTS[0]}
            )
        # MLflow's JSON parser casts a boolean column with astype(bool), turning null into False
        # and any string into True before predict could refuse them; declared Any, the values
        # reach feature_matrix as sent. (Float columns keep NaN and inf; integer columns holding
        # them are refused by MLflow's own schema check, naming the column.)
        signature.inputs = Schema(
            [
                ColSpec(AnyType(), c) if np.issubdtype(t, np.bool_) else spec
                for spec, (c, t) in zip(signature.inputs.inputs, raw_types.items(), strict=True)
            ]
        )
        # MLflow prints registry chatter straight to stderr; keep it for --verbose logs only.
        chatter = io.StringIO()
        # Checking the input example loads the model, which puts its code folder (a temporary
        # copy) in front of sys.path for good: keep this process's import path as it was.
        import_path = list(sys.path)
        digest = model_digest(model, job, feature_set.version)
        existing = _registered_with_digest(tracker, register_as, digest) if register_as else None
        try:
            with tracker.active(run_id), contextlib.redirect_stderr(chatter):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=TabularTorchModel(),
                    artifacts=artifacts,
                    signature=signature,
                    input_example=example,
                    registered_model_name=None if existing else register_as,
                    code_paths=code_to_ship(job.model),  # MLflow leaves out __pycache__
                    pip_requirements=pip_requirements(),
                    metadata={
                        "raylens_version": raylens.__version__,
                        "feature_set": feature_set.name,
                        "feature_set_version": feature_set.version,
                        "task": job.task.kind,
                        **lineage,
                    },
                )
        finally:
            sys.path[:] = import_path
    if chatter.getvalue().strip():
        logging.getLogger(__name__).info(chatter.getvalue().strip())
    if existing is not None:
        return LoggedModel(info.model_uri, existing, registered_now=False)
    version = str(info.registered_model_version) if register_as and info.registered_model_version else None
    if register_as and version:
        _describe_version(tracker, register_as, version, digest, feature_set, run_id, lineage, headline or {})
    return LoggedModel(info.model_uri, version, registered_now=version is not None)


@dataclass(frozen=True)
class LoggedModel:
    """Where a logged model is, and its registered version: new, or the identical one before."""

    uri: str
    version: str | None
    registered_now: bool


def model_digest(model: torch.nn.Module, job: TrainJob, feature_set_version: str) -> str:
    """What makes two models the same: their weights, architecture, task and feature set."""
    digest = hashlib.sha256()
    task = asdict(job.task)
    if not task["class_weights"]:  # unweighted: described as before the field existed
        del task["class_weights"]
    described = [job.model.model_dump(), task, feature_set_version]
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


DIGEST_TAG = "raylens.model_digest"


def _registered_with_digest(tracker: MlflowTracker, name: str, digest: str) -> str | None:
    """The version of ``name`` already holding this very model, if any."""
    try:
        versions = tracker.client.search_model_versions(f"name='{name}' and tags.`{DIGEST_TAG}` = '{digest}'")
    except MlflowException:  # no such registered model yet
        return None
    return str(min(int(v.version) for v in versions)) if versions else None


def _describe_version(
    tracker: MlflowTracker,
    name: str,
    version: str,
    digest: str,
    feature_set: FeatureSet,
    run_id: str,
    lineage: Mapping[str, str],
    headline: Mapping[str, float],
) -> None:
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in headline.items())
    description = (
        f"Trained by raylens {raylens.__version__} on feature set {feature_set.name}@{feature_set.version}"
        f" (run {run_id})" + (f"; {metrics}" if metrics else "") + "."
    )
    tracker.client.update_model_version(name, version, description=description)
    tags = {
        DIGEST_TAG: digest,
        "raylens.feature_set": feature_set.name,
        "raylens.feature_set_version": feature_set.version,
        **{f"raylens.{k}": v for k, v in lineage.items()},
        **{k: f"{v:.6g}" for k, v in headline.items()},
    }
    for key, value in tags.items():
        tracker.client.set_model_version_tag(name, version, key, value)
