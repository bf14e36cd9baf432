"""Batch prediction: a logged or registered model over CSV or Parquet files, batch by batch.

``raylens predict models:/churn/3 data/ --out scores.parquet`` reads each file in batches (never
a whole file in memory), scores each batch with the MLflow pyfunc model — the same code, transforms
and input checks as the served model — and writes one output file: the columns asked to be kept,
``prediction``, and for a classifier one ``probability_<class>`` column per class. The output is
written aside and renamed into place at the end, so a failure leaves no partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raylens.errors import UserError, did_you_mean
from raylens.features.sources import DataFiles, data_files, stream_batches

OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet"}
PREDICTION = "prediction"
PROBABILITY = "probability_"
BATCH_ROWS = 65_536
"""Rows scored at once: large enough that the network's forward pass dominates, small enough that
a batch of a wide table stays a few hundred MB."""

# MLflow's column types → the Arrow types a CSV column is read as, so every batch of a file gets
# the type the model's signature expects (Arrow would otherwise infer per block: a float column
# whose first block holds whole numbers would be read as int64).
_CSV_TYPES = {"double": pa.float64(), "float": pa.float32(), "long": pa.int64(), "integer": pa.int32()}


@dataclass(frozen=True)
class Prediction:
    """What ``predict_files`` wrote."""

    out: Path
    rows: int
    columns: list[str]


def predict_files(
    model_uri: str,
    data: Path,
    out: Path,
    *,
    tracking_uri: str,
    keep: Sequence[str] = (),
    overwrite: bool = False,
    batch_rows: int = BATCH_ROWS,
    on_batch: Callable[[int], None] = lambda rows: None,
) -> Prediction:
    """Score every row of the CSV or Parquet file(s) at ``data`` with ``model_uri`` and write
    ``out`` (.csv or .parquet). ``UserError`` (nothing written) for a mistake in the input."""
    out_format = OUTPUT_FORMATS.get(out.suffix)
    if out_format is None:
        raise UserError(f"--out: '{out}' must end in .csv or .parquet (the output's format)")
    if out.exists() and not overwrite:
        raise UserError(f"--out: '{out}' exists; choose another file, or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--out: the folder '{out.parent}' does not exist; create it first")
    files = data_files(data, str(data), where="DATA")
    model = load_model(model_uri, tracking_uri)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        rows, columns = _write(model, files, partial, out_format, keep, batch_rows, on_batch)
        os.replace(partial, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return Prediction(out, rows, columns)


def load_model(model_uri: str, tracking_uri: str) -> Any:
    """The pyfunc model at ``model_uri`` (``models:/name/version``, ``models:/name@alias``,
    ``runs:/id/model`` or a local path), read from ``tracking_uri``'s store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from raylens.trainer.tracking import redact

    try:
        location = _artifact_location(mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri), model_uri)
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
            return mlflow.pyfunc.load_model(local)
    except (MlflowException, OSError) as exc:
        raise UserError(
            f"MODEL_URI: cannot load '{model_uri}' from {redact(tracking_uri)} ({str(exc).splitlines()[0]}); "
            "give models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/model of a raylens model, "
            "with the --runs-dir (or --tracking-uri) it was recorded in"
        ) from None


def _artifact_location(client: Any, model_uri: str) -> str:
    """Where the artifacts of ``model_uri`` are stored. A ``models:/`` URI is resolved through
    ``client``'s registry: MLflow's own resolution reads the process-wide registry URI, which a
    library must not set."""
    if not model_uri.startswith("models:/"):
        return model_uri
    name = model_uri[len("models:/") :].strip("/")
    if name.startswith("m-"):  # a logged model's id
        return str(client.get_logged_model(name).artifact_location)
    if "@" in name:
        registered, alias = name.split("@", 1)
        version = client.get_model_version_by_alias(registered, alias).version
    else:
        registered, _, version = name.partition("/")
        if not version.isdigit():
            raise UserError(
                f"MODEL_URI: '{model_uri}' names no version; write models:/{registered}/VERSION "
                f"or models:/{registered}@ALIAS"
            )
    return str(client.get_model_version_download_uri(registered, version))


def _write(
    model: Any,
    files: DataFiles,
    partial: Path,
    out_format: str,
    keep: Sequence[str],
    batch_rows: int,
    on_batch: Callable[[int], None],
) -> tuple[int, list[str]]:
    classifier = (model.metadata.metadata or {}).get("task") == "classification"
    column_types = _csv_types(model) if files.format == "csv" else None
    writer: Any = None
    rows = 0
    try:
        for shown, start, batch in _batches(files, batch_rows, column_types):
            scored = _score(model, batch, shown, start, keep, classifier)
            if writer is None:
                writer = (
                    pq.ParquetWriter(partial, scored.schema)
                    if out_format == "parquet"
                    else pacsv.CSVWriter(partial, scored.schema)
                )
            writer.write_table(scored)
            rows += batch.num_rows
            on_batch(batch.num_rows)
        if writer is None:
            raise UserError(f"DATA: '{files.root}' holds no rows to predict")
        return rows, list(scored.column_names)
    finally:
        if writer is not None:
            writer.close()


def _batches(
    files: DataFiles, batch_rows: int, column_types: dict[str, pa.DataType] | None
) -> Iterator[tuple[str, int, pa.RecordBatch]]:
    """Each batch with the file it came from and the row number (in that file) it starts at."""
    for path, shown in files.named():
        start = 0
        for batch in stream_batches(
            path, shown, files.format, batch_rows, column_types=column_types, where="DATA"
        ):
            yield shown, start, batch
            start += batch.num_rows


def _score(
    model: Any, batch: pa.RecordBatch, shown: str, start: int, keep: Sequence[str], classifier: bool
) -> pa.Table:
    from mlflow.exceptions import MlflowException

    missing = [c for c in keep if c not in batch.schema.names]
    if missing:
        raise UserError(
            f"--keep: file '{shown}' has no column {', '.join(repr(c) for c in missing)}"
            f"{did_you_mean(missing[0], batch.schema.names)}; it has: {', '.join(batch.schema.names)}"
        )
    frame = batch.to_pandas()
    # Rows are numbered as in the file, so an input error names the rows a user can find there.
    frame.index = range(start, start + len(frame))
    try:
        labels = model.predict(frame)
        probabilities = model.predict(frame, params={"output": "probabilities"}) if classifier else None
    except MlflowException as exc:
        raise UserError(f"DATA: file '{shown}': {exc.message}") from None
    columns = {name: batch.column(name) for name in keep}
    columns[PREDICTION] = pa.array(labels.to_numpy() if hasattr(labels, "to_numpy") else labels)
    if probabilities is not None:
        for name in probabilities.columns:
            columns[f"{PROBABILITY}{name}"] = pa.array(probabilities[name].to_numpy())
    return pa.table(columns)


def _csv_types(model: Any) -> dict[str, pa.DataType]:
    """The Arrow type of each feature column the model's signature declares a number."""
    schema = model.metadata.get_input_schema()
    if schema is None:
        return {}
    types = {}
    for spec in schema.inputs:
        arrow = _CSV_TYPES.get(str(getattr(spec.type, "name", spec.type)))
        if spec.name is not None and arrow is not None:
            types[spec.name] = arrow
    return types
