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
from typing import Any, cast

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raylens.errors import UserError, did_you_mean
from raylens.features.sources import DataFiles, data_files, stream_batches

OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet"}
PREDICTION = "prediction"
INPUT_ERROR = "__raylens_input_error__"
"""The one column of what a Ray Data actor returns for a batch it refuses: the message."""
PROBABILITY = "probability_"
LARGE_INPUT_BYTES = 1 << 30
"""From this input size on (1 GiB), ``raylens predict`` scores on Ray Data unless told otherwise."""
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
    workers: int | None = None,
    address: str | None = None,
    on_batch: Callable[[int], None] = lambda rows: None,
) -> Prediction:
    """Score every row of the CSV or Parquet file(s) at ``data`` with ``model_uri`` and write
    ``out`` (.csv or .parquet). ``UserError`` (nothing written) for a mistake in the input.

    ``workers``: 1 scores in this process, batch after batch; more score on that many Ray Data
    actors (on the cluster at ``address``, else an embedded one), the output in the input's
    order. ``None`` chooses: Ray Data when the input holds at least ``LARGE_INPUT_BYTES``."""
    out_format = OUTPUT_FORMATS.get(out.suffix)
    if out_format is None:
        raise UserError(f"--out: '{out}' must end in .csv or .parquet (the output's format)")
    if out.exists() and not overwrite:
        raise UserError(f"--out: '{out}' exists; choose another file, or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--out: the folder '{out.parent}' does not exist; create it first")
    files = data_files(data, str(data), where="DATA")
    model = load_model(model_uri, tracking_uri)
    workers = workers or choose_workers(files)
    classifier = (model.metadata.metadata or {}).get("task") == "classification"
    column_types = _csv_types(model) if files.format == "csv" else None
    if workers == 1:
        scored = _score_here(model, files, keep, classifier, batch_rows, column_types)
    else:
        scorer = (model_uri, tracking_uri, tuple(keep), classifier)
        scored = _score_on_ray(scorer, files, workers, batch_rows, column_types, address)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        rows, columns = _write(scored, partial, out_format, on_batch)
        if not rows:
            raise UserError(f"DATA: '{data}' holds no rows to predict")
        os.replace(partial, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return Prediction(out, rows, columns)


def choose_workers(files: DataFiles) -> int:
    """One process for inputs that score in seconds; every core's worth of Ray Data actors for
    large ones, where starting Ray (seconds) is repaid."""
    size = sum(path.stat().st_size for path in files.paths)
    return max(1, os.cpu_count() or 1) if size >= LARGE_INPUT_BYTES else 1


def load_model(model_uri: str, tracking_uri: str) -> Any:
    """The pyfunc model at ``model_uri`` (``models:/name/version``, ``models:/name@alias``,
    ``runs:/id/model`` or a local path), read from ``tracking_uri``'s store."""
    return load_model_sized(model_uri, tracking_uri)[0]


def load_model_sized(model_uri: str, tracking_uri: str) -> tuple[Any, int]:
    """``load_model``, and the bytes its artifacts take on disk."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from raylens.trainer.tracking import redact

    try:
        location = _artifact_location(mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri), model_uri)
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
            size = sum(f.stat().st_size for f in Path(local).rglob("*") if f.is_file())
            return mlflow.pyfunc.load_model(local), size
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
    scored: Iterator[pa.Table], partial: Path, out_format: str, on_batch: Callable[[int], None]
) -> tuple[int, list[str]]:
    """Write the scored batches to ``partial`` as they come; the rows and columns written."""
    writer: Any = None
    rows, columns = 0, []
    try:
        for table in scored:
            if writer is None:
                columns = list(table.column_names)
                writer = (
                    pq.ParquetWriter(partial, table.schema)
                    if out_format == "parquet"
                    else pacsv.CSVWriter(partial, table.schema)
                )
            writer.write_table(table)
            rows += table.num_rows
            on_batch(table.num_rows)
        return rows, columns
    finally:
        if writer is not None:
            writer.close()


def _score_here(
    model: Any,
    files: DataFiles,
    keep: Sequence[str],
    classifier: bool,
    batch_rows: int,
    column_types: dict[str, pa.DataType] | None,
) -> Iterator[pa.Table]:
    """Each file in batches, scored in this process; errors name the file and its rows."""
    for path, shown in files.named():
        start = 0
        for batch in stream_batches(
            path, shown, files.format, batch_rows, column_types=column_types, where="DATA"
        ):
            yield score_batch(model, batch, keep, classifier, where=f"file '{shown}'", first_row=start)
            start += batch.num_rows


class _Scorer:
    """A Ray Data actor's scoring function: loads the model once, then scores batches."""

    def __init__(self, model_uri: str, tracking_uri: str, keep: tuple[str, ...], classifier: bool) -> None:
        self.model = load_model(model_uri, tracking_uri)
        self.keep, self.classifier = keep, classifier

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Ray Data does not say which file or row a batch starts at: rows are numbered in the batch.
        # A mistake in the input comes back as a value: raised here, Ray would bury its message
        # in a traceback of its own.
        try:
            return score_batch(self.model, batch, self.keep, self.classifier, where="a batch of the input")
        except UserError as exc:
            return pa.table({INPUT_ERROR: [str(exc)]})


def _score_on_ray(
    scorer: tuple[str, str, tuple[str, ...], bool],
    files: DataFiles,
    workers: int,
    batch_rows: int,
    column_types: dict[str, pa.DataType] | None,
    address: str | None,
) -> Iterator[pa.Table]:
    """The files read and scored by Ray Data on ``workers`` actors (each a ``_Scorer`` made from
    ``scorer``'s arguments), yielded in the input's order."""
    import ray.data

    from raylens.cluster.runtime import RuntimeSettings, start_ray, stop_ray
    from raylens.ray_data_reads import first_read_path
    from raylens.trainer.artifacts import ONLINE_STORE_VARIABLE

    runtime = start_ray(RuntimeSettings.build(address=address))
    context = ray.data.DataContext.get_current()
    preserved = context.execution_options.preserve_order
    try:
        context.execution_options.preserve_order = True  # rows out in the order they came in
        paths = [str(p) for p in files.paths]
        with first_read_path():
            dataset = (
                ray.data.read_parquet(paths)
                if files.format == "parquet"
                else ray.data.read_csv(
                    paths, convert_options=pacsv.ConvertOptions(column_types=column_types or {})
                )
            )
        # The online store a model of entity ids looks features up in, named for the actors too.
        store = os.environ.get(ONLINE_STORE_VARIABLE)
        scored = dataset.map_batches(
            _Scorer,  # a class: Ray Data runs it as a pool of actors, each loading the model once
            fn_constructor_args=scorer,
            batch_size=batch_rows,
            batch_format="pyarrow",
            concurrency=workers,
            num_cpus=1,
            runtime_env={"env_vars": {ONLINE_STORE_VARIABLE: store}} if store else None,
        )
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            batch = cast(pa.Table, batch)
            if INPUT_ERROR in batch.column_names:
                raise UserError(batch.column(INPUT_ERROR)[0].as_py())
            yield batch
    finally:
        context.execution_options.preserve_order = preserved
        stop_ray(runtime)


def score_batch(
    model: Any,
    batch: pa.Table | pa.RecordBatch,
    keep: Sequence[str],
    classifier: bool,
    *,
    where: str,
    first_row: int = 0,
) -> pa.Table:
    """One batch scored: the ``keep`` columns, ``prediction`` and, for a classifier, the class
    probabilities. An input error is a ``UserError`` naming ``where`` and the rows (numbered
    from ``first_row``)."""
    from mlflow.exceptions import MlflowException

    names = batch.schema.names
    missing = [c for c in keep if c not in names]
    if missing:
        raise UserError(
            f"--keep: {where} has no column {', '.join(repr(c) for c in missing)}"
            f"{did_you_mean(missing[0], names)}; it has: {', '.join(names)}"
        )
    frame = batch.to_pandas()
    # Rows are numbered as in the file, so an input error names the rows a user can find there.
    frame.index = range(first_row, first_row + len(frame))
    try:
        labels = model.predict(frame)
        probabilities = model.predict(frame, params={"output": "probabilities"}) if classifier else None
    except MlflowException as exc:
        raise UserError(f"DATA: {where}: {exc.message}") from None
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
