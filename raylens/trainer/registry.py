"""The model registry: a trained model logged as the run's pyfunc model, registered with lineage.

A registered version carries a description and tags: the model's digest (an identical model is
not registered twice), the feature set and its version, the git commit, the headline metrics.
The tracker is the one caller (``MlflowTracker.log_model``): ``raylens.trainer.run`` asks it to
log whatever the family, and a tracker that records nothing logs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext

import raylens
from raylens.features import FeatureSet, invert_all, transforms_from_dicts
from raylens.trainer.artifacts import (
    ONLINE_STORE_PARAM,
    OUTPUTS,
    TabularModel,
    code_to_ship,
    pip_requirements,
    write_model_files,
)
from raylens.trainer.family import Trained

if TYPE_CHECKING:
    from raylens.trainer.family import TrainJob
    from raylens.trainer.tracking import MlflowTracker


def log_model(
    tracker: MlflowTracker,
    run_id: str,
    trained: Trained,
    job: TrainJob,
    feature_set: FeatureSet,
    x_test: np.ndarray,
    register_as: str | None,
    lineage: Mapping[str, str],
    headline: Mapping[str, float] | None = None,
) -> LoggedModel:
    """Log ``trained`` as a pyfunc model of run ``run_id`` and register it as ``register_as``.

    A version carries a description and tags (the model's digest, feature-set version, lineage,
    ``headline`` metrics). A model identical to a registered version — same weights, model,
    task and feature-set version — is logged with its run but not registered again: the
    existing version is returned."""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.types import DataType
    from mlflow.types.schema import AnyType, ColSpec, Schema

    manifest = feature_set.manifest
    columns = manifest.model_inputs  # the source's columns, before encodings
    # The signature takes the columns with the types the user's raw data has (from the manifest),
    # and the input example is raw rows the manifest kept.
    raw_types = {c: pa.type_for_alias(manifest.raw_schema[c]).to_pandas_dtype() for c in columns}
    if manifest.sample:
        example = pd.DataFrame(manifest.sample, columns=columns)
    else:  # a version stored without a sample: its rows transformed back
        sample = x_test[:5] if len(x_test) else feature_set.read("train").x[:5]
        example = pd.DataFrame(
            invert_all(transforms_from_dicts(manifest.transforms), sample, columns), columns=columns
        )
        whole = [c for c, t in raw_types.items() if not np.issubdtype(t, np.floating)]
        example[whole] = example[whole].round()  # undo float error before casting back to int/bool
    example = example.astype(raw_types)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_model_files(
            Path(tmp), trained, job.model, job.task, feature_set, registered_name=register_as
        )
        loaded = TabularModel()
        context = PythonModelContext(artifacts=files.files, model_config={})
        loaded.load_context(context)
        with warnings.catch_warnings():
            # MLflow's hint that integer columns cannot hold missing values: the served model
            # refuses such rows with the column named, which is what it should do.
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
            params = {"output": OUTPUTS[0]}
            if manifest.entity is not None:
                params[ONLINE_STORE_PARAM] = ""  # default: the RAYLENS_ONLINE_STORE variable
            signature = infer_signature(example, loaded.predict(context, example), params=params)
        # MLflow's JSON parser casts a boolean column with astype(bool), turning null into False
        # and any string into True before predict could refuse them; declared Any, the values
        # reach feature_matrix as sent. (Float columns keep NaN and inf; integer columns holding
        # them are refused by MLflow's own schema check, naming the column.)
        inputs = [
            ColSpec(AnyType(), c) if np.issubdtype(t, np.bool_) else spec
            for spec, (c, t) in zip(signature.inputs.inputs, raw_types.items(), strict=True)
        ]
        if manifest.entity is not None:
            # Either the feature columns or the entity ids alone (their features then come from
            # the online store): none is required by the schema, the model says what is missing.
            numbered = "int" in manifest.raw_schema.get(manifest.entity, "")
            inputs = [ColSpec(spec.type, spec.name, required=False) for spec in inputs]
            inputs.append(
                ColSpec(DataType.long if numbered else DataType.string, manifest.entity, required=False)
            )
        signature.inputs = Schema(inputs)
        # MLflow prints registry chatter straight to stderr; keep it for --verbose logs only.
        chatter = io.StringIO()
        # Checking the input example loads the model, which puts its code folder (a temporary
        # copy) in front of sys.path for good: keep this process's import path as it was.
        import_path = list(sys.path)
        digest = model_digest(files.content, job, feature_set.version)
        existing = _registered_with_digest(tracker, register_as, digest) if register_as else None
        try:
            with tracker.active(run_id), contextlib.redirect_stderr(chatter):
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=TabularModel(),
                    artifacts=files.files,
                    signature=signature,
                    input_example=example,
                    registered_model_name=None if existing else register_as,
                    code_paths=code_to_ship(files),  # MLflow leaves out __pycache__
                    pip_requirements=pip_requirements(),
                    metadata={
                        "raylens_version": raylens.__version__,
                        "feature_set": feature_set.name,
                        "feature_set_version": feature_set.version,
                        "task": job.task.kind,
                        "model_family": job.model.family,
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


def model_digest(content: bytes, job: TrainJob, feature_set_version: str) -> str:
    """What makes two models the same: their fitted state (``ModelFiles.content``), model
    section, task and feature set."""
    digest = hashlib.sha256()
    task = asdict(job.task)
    if not task["class_weights"]:  # unweighted: described as before the field existed
        del task["class_weights"]
    described = [job.model.model_dump(), task, feature_set_version]
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    digest.update(content)
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
