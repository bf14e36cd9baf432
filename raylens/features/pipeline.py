"""The feature pipeline: source → prepare → split → fit transforms → versioned feature set.

Two steps, so a caller can check everything before anything is written: ``plan_feature_set`` does
all the work and every check and writes nothing; ``publish_feature_set`` writes the plan to the
offline store. ``build_feature_set`` is both in one call.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylens.errors import UserError, did_you_mean
from raylens.features.config import DataConfig, FeaturesConfig, ImputeStep, encoded_columns
from raylens.features.encoders import (
    FittedEncoder,
    check_encodings,
    encode_table,
    encoded_feature_columns,
    fit_encoders,
)
from raylens.features.manifest import (
    SAMPLE_ROWS,
    ColumnStatistics,
    Manifest,
    SourceRecord,
    SplitRecord,
    TargetStatistics,
)
from raylens.features.prepare import (
    candidate_features,
    check_feature_counts,
    check_feature_type,
    checked_feature_columns,
    feature_block,
    missing_and_infinite,
    prepare_target,
)
from raylens.features.sources import (
    READ_BATCH_ROWS,
    SourceStream,
    WiderTypes,
    load_source,
    open_source,
    table_stream,
)
from raylens.features.splits import SplitIndices, split_column, split_rows
from raylens.features.store import (
    ENTITY,
    RAW_PREFIX,
    ROW,
    TIME,
    FeatureSet,
    SplitArrays,
    list_feature_sets,
    versioned_manifest,
    write_feature_set,
)
from raylens.features.transforms import apply_all, fit_all
from raylens.features.validation import RowChecks, Verdict
from raylens.features.views import join_views, views_fingerprint
from raylens.storage import Location

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""A feature-set name becomes a folder of the store: the spec's rule for names."""


@dataclass(frozen=True, eq=False)
class PlannedFeatureSet:
    """A feature set computed and checked, not yet written (a large split's matrix lives in a
    temporary file, memory-mapped, until the plan is let go).

    ``version`` and ``manifest`` are what ``publish_feature_set`` stores (the manifest's
    ``created_at`` is the planning time). The arrays are read-only and the manifest frozen, so what
    is published is what was planned.
    """

    manifest: Manifest
    splits: Mapping[str, SplitArrays]
    """Transformed features and encoded targets of each split, as they will be stored."""
    quarantined: pa.Table | None = None
    """The source rows data validation set aside, with their reasons."""

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def feature_columns(self) -> list[str]:
        return list(self.manifest.feature_columns)

    @property
    def classes(self) -> list[Any] | None:
        classes = self.manifest.classes
        return list(classes) if classes is not None else None

    @property
    def num_outputs(self) -> int:
        return self.manifest.num_outputs

    @property
    def source_fingerprint(self) -> str:
        return self.manifest.source.fingerprint

    def sample(self, n: int) -> np.ndarray:
        """The first ``n`` transformed training rows (fewer if the split is smaller), float32.

        Enough to build a model and run one forward pass before anything is written.
        """
        if n < 0:
            raise ValueError(f"sample needs n >= 0, got {n}")
        return np.array(self.splits["train"].x[:n], dtype=np.float32)


def plan_feature_set(
    name: str,
    data: DataConfig,
    features: FeaturesConfig,
    base_dir: Path | None = None,
    store_root: Path | str | Location | None = None,
    *,
    batch_rows: int = READ_BATCH_ROWS,
    rows_done: RowsDone | None = None,
) -> PlannedFeatureSet:
    """Run the data prepare and feature pipelines; every check, no writes. With ``store_root``,
    a version built there from the same source bytes and sections is taken as the plan without
    reading the rows again.

    The source is read in two passes of ``batch_rows`` rows at a time (the batch size changes
    nothing in the result): the first checks every row and keeps the few columns the splits and
    encodings are fitted on; the second encodes each batch into its split's float matrix, held in
    a temporary file once it is larger than ``SPILL_BYTES``. The source's rows are never in memory
    together. ``rows_done`` hears of each batch of each pass (for a progress bar)."""
    if not _NAME.match(name):
        raise UserError(
            f"name: '{name}' cannot name a feature set; use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    fingerprint = views_fingerprint(data, base_dir)
    key = _build_key(name, fingerprint, data, features) if fingerprint is not None else ""
    if store_root is not None and key:
        try:
            stored_versions = list_feature_sets(store_root, name)
        except (OSError, ValueError):  # a store that cannot be listed: the build says so later
            stored_versions = []
        for stored in reversed(stored_versions):
            if stored.manifest.build_key == key:
                return _stored_plan(stored)
    source = _open_source(data, base_dir)
    told = rows_done or _no_progress
    try:
        return _plan(name, key, fingerprint, source, data, features, batch_rows, told)
    except WiderTypes:  # a CSV file's later rows: the first block's types fit no longer
        return _plan(name, key, fingerprint, source.widened(), data, features, batch_rows, told)


def _plan(
    name: str,
    key: str,
    fingerprint: str | None,
    source: SourceStream,
    data: DataConfig,
    features: FeaturesConfig,
    batch_rows: int,
    rows_done: RowsDone,
) -> PlannedFeatureSet:
    schema = source.schema
    allowed = features.missing_allowed(candidate_features(schema.names, data))
    # The checks of the validation rules' and the spec's columns, before a row is read; the rest
    # after the first pass, in the order they always had (an empty source says so first).
    checks = RowChecks(schema, data, allow_missing=allowed)
    input_columns = checked_feature_columns(schema.names, None, data)
    # Every column but the categories is checked before the split (bucketize's too: numbers).
    numeric = [c for c in input_columns if c not in features.categorical]
    scan = _scan(source, data, features, checks, input_columns, numeric, allowed, batch_rows, rows_done)
    verdict, kept = scan.verdict, scan.kept
    checked_feature_columns(schema.names, verdict.kept, data)
    check_encodings(features, schema, input_columns)
    for column in numeric:  # each column's type, then its values, as a build in memory checks them
        check_feature_type(column, schema.field(column).type)
        check_feature_counts(column, scan.kept_count(column, "missing"), scan.kept_count(column, "infinite"))
    target = prepare_target(kept, data)
    by = split_column(kept, data.split)
    stratify = target.task == "classification" and by is None
    split = split_rows(target.y, data.split, stratify=stratify, labels=target.classes, by=by)
    encoders = fit_encoders(features, _training_rows(kept, features, split.train), input_columns)
    feature_columns = encoded_feature_columns(encoders, input_columns) if encoders else input_columns
    keys = _entity_keys(kept, data, input_columns, by, encoders)
    del kept, scan

    encoded_splits = _encode_splits(
        source, verdict, encoders, input_columns, feature_columns, split, batch_rows, rows_done
    )
    x_train = encoded_splits.x["train"]
    statistics = _column_statistics(x_train, feature_columns)
    encoded = {c for e in encoders for c in e.outputs()}
    fitted = fit_all(features.transforms, x_train, feature_columns, encoded, in_place=True)
    for held_out in ("valid", "test"):
        apply_all(fitted, encoded_splits.x[held_out], feature_columns, in_place=True)
    indices = {"train": split.train, "valid": split.valid, "test": split.test}

    def arrays(split_name: str) -> SplitArrays:
        index = indices[split_name]
        x, y = encoded_splits.x[split_name], target.y[index]
        x.flags.writeable = False
        y.flags.writeable = False
        return SplitArrays(x, y, {key: values[index] for key, values in keys.items()} if keys else None)

    splits = MappingProxyType({each: arrays(each) for each in ("train", "valid", "test")})
    record = SourceRecord(uri=source.uri, fingerprint=source.fingerprint)
    raw_schema = {field.name: str(field.type) for field in schema}
    target_statistics = None
    if target.task == "regression":
        y_train = target.y[split.train].astype(np.float64)
        target_statistics = TargetStatistics(mean=float(y_train.mean()), std=float(y_train.std() or 1.0))
    manifest = Manifest(
        name=name,
        version="",
        created_at=datetime.now(UTC).isoformat(
            timespec="microseconds"
        ),  # orders versions built in one second
        source=record,
        raw_schema=raw_schema,
        target=data.target,
        entity=data.entity,
        task=target.task,
        task_decision=target.task_decision,
        classes=target.classes,
        feature_columns=feature_columns,
        split=SplitRecord(**data.split.model_dump(), stratified=stratify),
        statistics=statistics,
        transforms=[t.to_dict() for t in fitted],
        encoders=[e.to_dict() for e in encoders] or None,
        input_columns=input_columns if encoders else None,
        target_statistics=target_statistics,
        sample=encoded_splits.sample,
        quarantined=verdict.counts,
        build_key=key if source.fingerprint == fingerprint else "",
    )
    return PlannedFeatureSet(versioned_manifest(manifest, splits), splits, encoded_splits.quarantined)


def publish_feature_set(planned: PlannedFeatureSet, store_root: Path | str | Location) -> FeatureSet:
    """Write a planned feature set to the offline store (atomically) and return its handle.

    A version already stored is kept as it is (with its own ``created_at``) and returned.
    """
    return write_feature_set(
        store_root, planned.manifest, planned.feature_columns, planned.splits, planned.quarantined
    )


def build_feature_set(
    name: str,
    data: DataConfig,
    features: FeaturesConfig,
    store_root: Path | str | Location,
    base_dir: Path | None = None,
) -> FeatureSet:
    """Plan and publish in one call. Every check runs before the first byte is written, so bad
    input leaves the store untouched."""
    return publish_feature_set(plan_feature_set(name, data, features, base_dir), store_root)


def _column_statistics(x: np.ndarray, columns: list[str]) -> dict[str, ColumnStatistics]:
    """Raw (pre-transform) statistics of the training split, per feature column, over the values
    present (an imputed column's missing ones left out); one column in float64 at a time."""
    statistics = {}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with no value: NaN, said so
        for i, name in enumerate(columns):
            column = x[:, i].astype(np.float64)
            statistics[name] = ColumnStatistics(
                mean=float(np.nanmean(column)),
                std=float(np.nanstd(column)),
                min=float(np.nanmin(column)),
                max=float(np.nanmax(column)),
            )
    return statistics


def _training_rows(table: pa.Table, features: FeaturesConfig, train: np.ndarray) -> pa.Table:
    """The training rows of the columns an encoding is fitted on (no copy of the others)."""
    named = sorted(
        {c for step in features.encodings for c in encoded_columns(step)} & set(table.column_names)
    )
    return table.select(named).take(pa.array(train, type=pa.int64()))


PIPELINE = 2
"""Raised whenever the pipeline's code computes other rows from the same inputs: a version built
by another pipeline is not reused."""


def _build_key(name: str, fingerprint: str, data: DataConfig, features: FeaturesConfig) -> str:
    sections = {
        "pipeline": PIPELINE,
        "name": name,
        "fingerprint": fingerprint,
        "data": data.model_dump(mode="json"),
        "features": features.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:32]


def _stored_plan(stored: FeatureSet) -> PlannedFeatureSet:
    """A stored version as a plan: its manifest and its splits (read-only), publishing it a no-op."""

    def read(split: str) -> SplitArrays:
        arrays = stored.read(split)
        arrays.x.flags.writeable = False
        arrays.y.flags.writeable = False
        return arrays

    splits = MappingProxyType({split: read(split) for split in ("train", "valid", "test")})
    return PlannedFeatureSet(stored.manifest, splits, stored.read_quarantined())


def _entity_keys(
    table: pa.Table,
    data: DataConfig,
    feature_columns: list[str],
    by: np.ndarray | None,
    encoders: list[FittedEncoder],
) -> dict[str, np.ndarray]:
    """Where the spec names an entity column: each row's id, row number and (with a time split)
    time, kept beside the features for the online store; with the source's own values of the
    encoded columns (an encoding cannot be undone, and the model takes those values)."""
    name = data.entity
    if name is None:
        return {}
    if name not in table.column_names:
        raise UserError(
            f"data.entity: column '{name}' is not in the data{did_you_mean(name, table.column_names)}; "
            f"columns are: {', '.join(table.column_names[:30])}"
        )
    if name in feature_columns:
        raise UserError(
            f"data.entity: column '{name}' is also a feature column; an id is no feature: "
            f"leave it out with data.drop: [{name}]"
        )
    column = table.column(name)
    if column.null_count:
        raise UserError(
            f"data.entity: column '{name}' has {column.null_count} missing ids; every row needs its entity"
        )
    keys = {ENTITY: column.to_numpy(zero_copy_only=False), ROW: np.arange(table.num_rows, dtype=np.int64)}
    if data.split.time is not None and by is not None:
        keys[TIME] = by
    for encoded in sorted({e.column for e in encoders}):
        keys[RAW_PREFIX + encoded] = table.column(encoded).to_numpy(zero_copy_only=False)
    return keys


RowsDone = Callable[[str, int, int | None], None]
"""Told after each batch of a pass over the source: what the pass does, the source rows it has
read, and of how many (None: unknown until the pass ends, as for a CSV file)."""
CHECKING, ENCODING = "checking the rows", "encoding the splits"


def _no_progress(what: str, done: int, total: int | None) -> None:
    pass


def _open_source(data: DataConfig, base_dir: Path | None) -> SourceStream:
    """The rows to build from: the source, or (with feature views) its rows joined to the views."""
    if not data.views:
        return open_source(data.source, base_dir)
    joined = join_views(load_source(data.source, base_dir), data, base_dir)
    return table_stream(joined.table, joined.uri, joined.fingerprint)


@dataclass(frozen=True)
class _Scan:
    """What the first pass keeps: the verdict on every row, the kept rows of the columns the
    target, split, entity and encodings need, and where numeric features are missing or infinite."""

    verdict: Verdict
    kept: pa.Table
    bad_rows: Mapping[tuple[str, str], np.ndarray]
    """(column, "missing" or "infinite"): the source rows that are."""

    def kept_count(self, column: str, kind: str) -> int:
        rows = self.bad_rows.get((column, kind))
        if rows is None or not len(rows):
            return 0
        if self.verdict.reasons is None:
            return len(rows)
        return int((self.verdict.reasons[rows] < 0).sum())


def _scan(
    source: SourceStream,
    data: DataConfig,
    features: FeaturesConfig,
    checks: RowChecks,
    input_columns: list[str],
    numeric: list[str],
    allowed: set[str],
    batch_rows: int,
    rows_done: RowsDone,
) -> _Scan:
    names = source.schema.names
    needed = [data.target, data.split.time or data.split.group, data.entity]
    needed += [c for step in features.encodings for c in encoded_columns(step)]
    for step in features.transforms:  # an impute indicator keeps its column's source values too
        if isinstance(step, ImputeStep) and step.impute.indicator:
            needed += input_columns if step.impute.columns == "*" else step.impute.columns
    columns = [c for c in dict.fromkeys(needed) if c is not None and c in names]
    # A column of another type is refused after this pass, by its type.
    numbers = [c for c in numeric if _is_number(source.schema.field(c).type)]
    parts: list[pa.RecordBatch] = []
    bad: dict[tuple[str, str], list[np.ndarray]] = {}
    offset = 0
    for batch in source.batches(batch_rows):
        checks.add(batch)
        parts.append(batch.select(columns))
        for name in numbers:
            column = batch.column(name)
            missing, infinite = missing_and_infinite(column)
            if missing and name not in allowed:
                rows = np.flatnonzero(_numpy_bool(pc.is_null(column, nan_is_null=True)))
                bad.setdefault((name, "missing"), []).append(rows + offset)
            if infinite:
                rows = np.flatnonzero(_numpy_bool(pc.is_inf(column)))
                bad.setdefault((name, "infinite"), []).append(rows + offset)
        offset += batch.num_rows
        rows_done(CHECKING, offset, source.rows)
    verdict = checks.verdict()
    pa.default_memory_pool().release_unused()  # the pass's decoding buffers, kept by the allocator
    schema = pa.schema([source.schema.field(c) for c in columns])
    table = pa.Table.from_batches(parts, schema=schema if not parts else None)
    del parts
    keep = verdict.keep(0, verdict.rows)
    kept = table.filter(pa.array(keep)) if keep is not None else table
    return _Scan(verdict, kept, {k: np.concatenate(v) for k, v in bad.items()})


def _is_number(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_boolean(type_)


def _numpy_bool(mask: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


SPILL_BYTES = 64 << 20
"""A split's feature matrix larger than this is held in a temporary file (memory-mapped, deleted
as soon as it is made), so a build never needs its splits in memory."""


def _matrix(rows: int, columns: int) -> np.ndarray:
    size = rows * columns * 4
    if size <= SPILL_BYTES:
        return np.empty((rows, columns), dtype=np.float32)
    # Unlinked at once: the mapping is the file's only reference, and it goes with the array.
    with tempfile.TemporaryFile(prefix="raylens-split-") as file:
        try:
            # The blocks reserved now: a disk that fills while the matrix is written into a sparse
            # file kills the process (SIGBUS) instead of raising.
            os.posix_fallocate(file.fileno(), 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it
                raise UserError(
                    f"features: no room for a split's {size / 2**20:,.0f} MiB of features in "
                    f"{tempfile.gettempdir()} ({exc.strerror}); free space there, or set TMPDIR to "
                    "a folder on a larger disk"
                ) from None
        return np.memmap(
            file,
            dtype=np.float32,
            mode="r+" if os.fstat(file.fileno()).st_size else "w+",
            shape=(rows, columns),
        )


@dataclass(frozen=True)
class _Encoded:
    x: Mapping[str, np.ndarray]
    """Each split's feature matrix (before the numeric transforms)."""
    sample: list[dict[str, Any]]
    quarantined: pa.Table | None


def _encode_splits(
    source: SourceStream,
    verdict: Verdict,
    encoders: list[FittedEncoder],
    input_columns: list[str],
    feature_columns: list[str],
    split: SplitIndices,
    batch_rows: int,
    rows_done: RowsDone,
) -> _Encoded:
    """The second pass: each batch's kept rows encoded into the matrices of their splits (each
    split's rows stay in source order), the raw sample and the rows set aside collected."""
    names = ("train", "valid", "test")
    which = np.empty(verdict.kept, dtype=np.int8)
    position = np.empty(verdict.kept, dtype=np.int64)
    for code, name in enumerate(names):
        index = getattr(split, name)
        which[index] = code
        position[index] = np.arange(len(index))
    x = {name: _matrix(len(getattr(split, name)), len(feature_columns)) for name in names}
    sample_rows = split.train[:SAMPLE_ROWS]
    sample: list[dict[str, Any]] = []
    aside: list[pa.RecordBatch] = []
    offset = kept_before = 0
    for batch in source.batches(batch_rows):
        set_aside = verdict.set_aside(batch, offset)
        if set_aside is not None:
            aside.append(set_aside)
        keep = verdict.keep(offset, batch.num_rows)
        offset += batch.num_rows
        table = pa.Table.from_batches([batch if keep is None else batch.filter(pa.array(keep))])
        rows = slice(kept_before, kept_before + table.num_rows)
        kept_before += table.num_rows
        local = sample_rows[(sample_rows >= rows.start) & (sample_rows < rows.stop)] - rows.start
        if len(local):
            sample += table.select(input_columns).take(pa.array(local, type=pa.int64())).to_pylist()
        encoded = encode_table(encoders, table, input_columns) if encoders else table
        block = feature_block(encoded, feature_columns)
        for code, name in enumerate(names):
            chosen = which[rows] == code
            if chosen.any():
                at = position[rows][chosen]
                # A split's rows are in source order: a batch's fill one run of its matrix.
                x[name][at[0] : at[-1] + 1] = block[chosen]
        rows_done(ENCODING, offset, verdict.rows)
    quarantined = pa.Table.from_batches(aside) if aside else None
    pa.default_memory_pool().release_unused()
    return _Encoded(x, sample, quarantined)
