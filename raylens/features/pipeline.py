"""The feature pipeline: source → prepare → split → fit transforms → versioned feature set.

Two steps, so a caller can check everything before anything is written: ``plan_feature_set`` does
all the work and every check and writes nothing; ``publish_feature_set`` writes the plan to the
offline store. ``build_feature_set`` is both in one call.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow as pa

from raylens.errors import UserError, did_you_mean
from raylens.features.config import DataConfig, FeaturesConfig, encoded_columns
from raylens.features.encoders import FittedEncoder, check_encodings, fit_encoders
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
    check_feature_values,
    checked_feature_columns,
    prepare,
    prepare_target,
)
from raylens.features.sources import load_source
from raylens.features.splits import split_column, split_rows
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
from raylens.features.validation import validate
from raylens.features.views import join_views, views_fingerprint
from raylens.storage import Location

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""A feature-set name becomes a folder of the store: the spec's rule for names."""


@dataclass(frozen=True, eq=False)
class PlannedFeatureSet:
    """A feature set computed in memory and checked, not yet written.

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
) -> PlannedFeatureSet:
    """Run the data prepare and feature pipelines in memory; every check, no writes. With
    ``store_root``, a version built there from the same source bytes and sections is taken as
    the plan without reading the rows again."""
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
    raw = join_views(load_source(data.source, base_dir), data, base_dir)
    allowed = features.missing_allowed(candidate_features(raw.table.column_names, data))
    validated = validate(raw.table, data, allow_missing=allowed)
    table = validated.table
    input_columns = checked_feature_columns(table, data)
    check_encodings(features, table.schema, input_columns)
    # Every column but the categories is checked before the split (bucketize's too: numbers).
    check_feature_values(table, [c for c in input_columns if c not in features.categorical], allowed)
    target = prepare_target(table, data)
    by = split_column(table, data.split)
    stratify = target.task == "classification" and by is None
    split = split_rows(target.y, data.split, stratify=stratify, labels=target.classes, by=by)
    encoders = fit_encoders(features, _training_rows(table, features, split.train), input_columns)
    prepared = prepare(table, data, allow_missing=allowed, encoders=encoders)
    keys = _entity_keys(table, data, input_columns, by, encoders)
    sample = _raw_sample(table, input_columns, split.train[:SAMPLE_ROWS])
    source = SourceRecord(uri=raw.uri, fingerprint=raw.fingerprint)
    raw_schema = {field.name: str(field.type) for field in raw.table.schema}
    quarantined, quarantine_counts = validated.quarantined, validated.counts
    # From here on only the float matrix is needed: the source's rows go (a large source's
    # table weighs as much as the matrix and its splits together).
    del raw, validated, table

    x_train = prepared.x[split.train]  # a copy: fitting transforms it in place, into the split
    statistics = _column_statistics(x_train, prepared.feature_columns)
    encoded = {c for e in encoders for c in e.outputs()}
    fitted = fit_all(features.transforms, x_train, prepared.feature_columns, encoded, in_place=True)

    def arrays(index: np.ndarray, x: np.ndarray | None = None) -> SplitArrays:
        if x is None:
            x = apply_all(fitted, prepared.x[index], prepared.feature_columns, in_place=True)
        y = prepared.y[index]
        x.flags.writeable = False
        y.flags.writeable = False
        return SplitArrays(x, y, {name: values[index] for name, values in keys.items()} if keys else None)

    splits = MappingProxyType(
        {"train": arrays(split.train, x_train), "valid": arrays(split.valid), "test": arrays(split.test)}
    )
    target_statistics = None
    if prepared.task == "regression":
        y_train = prepared.y[split.train].astype(np.float64)
        target_statistics = TargetStatistics(mean=float(y_train.mean()), std=float(y_train.std() or 1.0))
    manifest = Manifest(
        name=name,
        version="",
        created_at=datetime.now(UTC).isoformat(
            timespec="microseconds"
        ),  # orders versions built in one second
        source=source,
        raw_schema=raw_schema,
        target=data.target,
        entity=data.entity,
        task=prepared.task,
        task_decision=prepared.task_decision,
        classes=prepared.classes,
        feature_columns=prepared.feature_columns,
        split=SplitRecord(**data.split.model_dump(), stratified=stratify),
        statistics=statistics,
        transforms=[t.to_dict() for t in fitted],
        encoders=[e.to_dict() for e in encoders] or None,
        input_columns=prepared.input_columns,
        target_statistics=target_statistics,
        sample=sample,
        quarantined=quarantine_counts,
        build_key=key if source.fingerprint == fingerprint else "",
    )
    return PlannedFeatureSet(versioned_manifest(manifest, splits), splits, quarantined)


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


def _raw_sample(table: pa.Table, columns: list[str], rows: np.ndarray) -> list[dict[str, Any]]:
    """The source's own values of ``columns`` at ``rows`` (source row numbers)."""
    return table.select(columns).take(pa.array(rows, type=pa.int64())).to_pylist()
