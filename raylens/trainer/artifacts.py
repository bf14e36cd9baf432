"""The model artifact: an MLflow pyfunc model that takes the raw feature columns a user has.

It holds the fitted model (its family's files), the model section and the fitted feature
transforms, so the transform a served model applies is the one fitted at training time, byte for
byte. The raylens package travels inside the model (MLflow ``code_paths``), so loading it needs
only the pinned distributions of ``pip_requirements()``: it installs where raylens itself does not.

Loading the model imports this module (the pickled ``TabularModel`` refers to it) and the model's
family, so they and their imports stay free of Ray, the CLI and plotting. Logging and registering
is ``raylens.trainer.registry``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

import raylens
from raylens.errors import UserError
from raylens.features import FeatureSet, apply_all, transforms_from_dicts
from raylens.features.encoders import FittedEncoder, encode_columns, encoders_from_dicts
from raylens.trainer.config import AnyModelConfig, parse_model_config
from raylens.trainer.family import ModelFiles, Trained, family_of
from raylens.trainer.task import TaskSpec

SPEC = "spec"

LOADER_DISTRIBUTIONS = (
    "mlflow",
    "cloudpickle",  # unpickles the python_model; pickles are only safe across the same version
    "torch",  # the torch family; the loader's import chain imports it for every family today
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
ONLINE_STORE_PARAM = "online_store"
"""The param naming the online store's file, for a model of a feature set with entity ids: a
request holding only ids gets each entity's features from there."""
ONLINE_STORE_VARIABLE = "RAYLENS_ONLINE_STORE"
"""Or the environment variable naming it (a serving container's setting)."""


def write_model_files(
    folder: Path,
    trained: Trained,
    model_config: AnyModelConfig,
    task: TaskSpec,
    feature_set: FeatureSet,
    *,
    registered_name: str | None = None,
) -> ModelFiles:
    """Write the family's files of the model and everything needed to load it; the pyfunc
    artifacts are the returned files'."""
    folder.mkdir(parents=True, exist_ok=True)
    files = family_of(model_config).model_files(trained, model_config, folder)
    spec = {
        "model": model_config.model_dump(),
        "task": asdict(task),
        "feature_columns": feature_set.feature_columns,
        "input_columns": feature_set.manifest.model_inputs,
        "encoders": feature_set.manifest.encoders or [],
        "entity": feature_set.manifest.entity,
        "classes": feature_set.classes,
        "transforms": feature_set.manifest.transforms,
        "feature_set": {"name": feature_set.name, "version": feature_set.version},
        "registered_name": registered_name,
    }
    (folder / "model_spec.json").write_text(json.dumps(spec, indent=2))
    return ModelFiles({**files.files, SPEC: str(folder / "model_spec.json")}, files.content, files.code)


class TabularModel(PythonModel):
    """Raw feature columns in, predictions out: class labels, or values in the target's units.

    A classifier called with ``params={"output": "probabilities"}`` returns a DataFrame with one
    float column per class, named ``str(label)`` in the order of the feature set's classes, each
    row the model's class probabilities (summing to 1; a network's: the softmax of its logits).

    Rows with a value that is not a finite number are refused with an error naming the columns and
    rows, never predicted: the model would turn them into a confident wrong answer.
    """

    def load_context(self, context: PythonModelContext) -> None:
        spec = json.loads(Path(context.artifacts[SPEC]).read_text())
        self.feature_columns: list[str] = spec["feature_columns"]
        self.classes: list[Any] | None = spec["classes"]
        self.task = TaskSpec(**spec["task"])
        self.transforms = transforms_from_dicts(spec["transforms"])
        # Absent in models logged before encodings: the feature columns are the input.
        self.input_columns: list[str] = spec.get("input_columns", self.feature_columns)
        self.encoders = encoders_from_dicts(spec.get("encoders", []))
        self.entity: str | None = spec.get("entity")
        self.feature_set_name: str = spec["feature_set"]["name"]
        # Missing values are the impute transforms' to fill, in these columns only.
        self.imputed = {c for t in self.transforms if t.kind == "impute" for c in t.columns}
        name = spec.get("registered_name")  # absent in models logged before it was recorded
        self.label = f"models:/{name}" if name else "the model"
        config = parse_model_config(spec["model"])
        self.predictor = family_of(config).load_predictor(
            context.artifacts, config, self.task, len(self.feature_columns)
        )

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray | pd.DataFrame:
        output = self._output(params)  # before the rows are read: a wrong param is said first
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        ids_alone = self.entity in frame.columns and not any(c in frame.columns for c in self.input_columns)
        if self.entity is not None and ids_alone:
            frame = self._looked_up(frame[self.entity], params)
        if self.encoders:
            frame = encoded_frame(frame, self.encoders, self.input_columns, self.label)
        raw = feature_matrix(frame, self.feature_columns, self.label, allow_missing=self.imputed)
        x = apply_all(self.transforms, raw, self.feature_columns)
        if output == "probabilities":
            columns = [str(label) for label in self.classes or []]
            return pd.DataFrame(self.predictor.predict_proba(x), columns=columns, index=frame.index)
        predicted = self.predictor.predict(x)
        if self.classes is not None:
            return np.asarray(self.classes)[predicted]
        return predicted

    def _looked_up(self, ids: pd.Series, params: dict[str, Any] | None) -> pd.DataFrame:
        """The input columns of entities ``ids`` from the online store (``raylens features
        materialize``): the latest vector of each, as the feature set kept it."""
        path = (params or {}).get(ONLINE_STORE_PARAM) or os.environ.get(ONLINE_STORE_VARIABLE)
        if not path:
            raise MlflowException(
                f"input holds only '{self.entity}' ids, and {self.label} looks their features up in an "
                f"online store: name its file with params={{'{ONLINE_STORE_PARAM}': PATH}} or the "
                f"{ONLINE_STORE_VARIABLE} environment variable",
                error_code=INVALID_PARAMETER_VALUE,
            )
        if not Path(path).is_file():
            raise MlflowException(
                f"params.{ONLINE_STORE_PARAM}: {path} is no online store (no such file); write one with "
                f"`raylens features materialize {self.feature_set_name} --online-store {path}`",
                error_code=INVALID_PARAMETER_VALUE,
            )
        from raylens.features.online import SqliteOnlineStore  # only models given ids need it

        store = SqliteOnlineStore(path)
        try:
            found = store.get(self.feature_set_name, ids.tolist())
        except UserError as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
        finally:
            store.close()
        absent = [c for c in self.input_columns if c not in found.column_names]
        if absent:
            raise MlflowException(
                f"the online store {path} holds feature set '{self.feature_set_name}' without columns "
                f"{', '.join(repr(c) for c in absent)}, which {self.label} takes; materialize the version "
                "it was trained on",
                error_code=INVALID_PARAMETER_VALUE,
            )
        frame = found.select(self.input_columns).to_pandas()
        frame.index = ids.index
        unknown = ids[frame.isna().all(axis=1).to_numpy()]
        if len(unknown):
            shown = ", ".join(repr(i) for i in unknown.tolist()[:SHOWN_ROWS])
            raise MlflowException(
                f"{len(unknown)} '{self.entity}' ids are not in the online store {path}: {shown}"
                f"{', ...' if len(unknown) > SHOWN_ROWS else ''}; send their feature columns instead",
                error_code=INVALID_PARAMETER_VALUE,
            )
        return frame

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


def encoded_frame(
    frame: pd.DataFrame, encoders: list[FittedEncoder], input_columns: list[str], label: str
) -> pd.DataFrame:
    """The feature columns from a request's raw ``input_columns``, encoded as in training; the
    columns no encoding touches are passed on as they are, for ``feature_matrix`` to check."""
    _require_columns(frame, input_columns, label)
    columns: dict[str, Any] = {c: frame[c] for c in input_columns}
    for column in {e.column for e in encoders}:
        try:
            columns[column] = pa.array(frame[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise MlflowException(
                f"input column {column!r} mixes kinds of values ({error}); {label} takes one kind per column",
                error_code=INVALID_PARAMETER_VALUE,
            ) from None
    try:
        encoded = encode_columns(encoders, columns, input_columns)
    except UserError as error:
        raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None
    return pd.DataFrame(
        {
            name: np.asarray(values) if not isinstance(values, pd.Series) else values
            for name, values in encoded.items()
        },
        index=frame.index,
    )


def _require_columns(frame: pd.DataFrame, columns: list[str], label: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MlflowException(
            f"input is missing feature columns {', '.join(repr(c) for c in missing)}; {label} takes "
            f"{len(columns)} columns: {', '.join(repr(c) for c in columns[:10])}"
            f"{', ...' if len(columns) > 10 else ''}",
            error_code=INVALID_PARAMETER_VALUE,
        )


def feature_matrix(
    frame: pd.DataFrame, feature_columns: list[str], label: str, allow_missing: set[str] | None = None
) -> np.ndarray:
    """The feature columns of ``frame`` as float32 (the training dtype), or an ``MlflowException``
    (HTTP 400 when served) naming each missing column, or each column holding NaN, inf, -inf, a
    value that is not a number or one beyond float32's range, with its first rows (the frame's
    index labels: positions for a request, the file's row numbers for ``raylens predict``)."""
    _require_columns(frame, feature_columns, label)
    block = frame[feature_columns]
    with np.errstate(over="ignore"):  # a finite value beyond float32's range becomes inf: reported
        try:
            x = block.to_numpy(dtype=np.float32, na_value=np.nan)
        except (TypeError, ValueError):
            # Strings among object columns (what MLflow lets through for boolean and Any columns)
            # fail the cast as a whole; converted value by value, each is reported where it is.
            x = np.column_stack([_as_float64(block[c]) for c in feature_columns]).astype(np.float32)
    bad = ~np.isfinite(x)
    for i, name in enumerate(feature_columns):
        if allow_missing and name in allow_missing:  # filled by an impute transform
            bad[:, i] &= ~np.isnan(x[:, i])
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


def code_to_ship(files: ModelFiles) -> list[str]:
    """The code the model needs besides its requirements: the raylens package and what its
    family names (a user factory's module)."""
    return [str(Path(raylens.__file__).parent), *files.code]
