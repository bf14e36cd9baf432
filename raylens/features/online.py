"""The online store: the latest feature vector of each entity, materialized from a stored version,
for lookups at prediction time.

Callers hold an ``OnlineStore`` (``get(entity_ids) -> pyarrow.Table``); the embedded default keeps
it in SQLite, one table per feature set. Another backend (Redis, DynamoDB) implements the same
two methods and no caller changes.

The values are the source's own (the stored features transformed back, whole-number columns
rounded): what the registered model takes as input, and transforms itself as it did in training.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from raylens.errors import UserError
from raylens.features.drift import whole_number_columns
from raylens.features.store import ENTITY, RAW_PREFIX, ROW, SPLITS, TIME, FeatureSet
from raylens.features.transforms import invert_all, transforms_from_dicts

ENTITY_COLUMN = "entity"
"""The key column of what ``get`` returns."""


class OnlineStore(Protocol):
    def write(self, feature_set: FeatureSet, latest: pa.Table) -> None:
        """Replace what the store holds for ``feature_set``'s name with ``latest``: one row per
        entity (``entity`` and the feature columns), all at once for readers."""
        ...

    def get(self, name: str, entity_ids: Sequence[Any]) -> pa.Table:
        """The feature vectors of ``entity_ids`` in feature set ``name``, in the order asked (an
        unknown id's row holds nulls)."""
        ...


def latest_per_entity(feature_set: FeatureSet) -> pa.Table:
    """One row per entity: its latest row over every split (by time where the version was split
    by time, then by the row's place in the source), with the source's feature values."""
    if feature_set.manifest.entity is None:
        raise UserError(
            f"feature set '{feature_set.name}@{feature_set.version}' keeps no entity ids: name the id "
            "column in data.entity and build the feature set again"
        )
    columns = feature_set.feature_columns
    table = pa.concat_tables([feature_set.read_keys(split) for split in SPLITS])
    order = [(TIME, "ascending"), (ROW, "ascending")] if TIME in table.column_names else [(ROW, "ascending")]
    table = table.sort_by(order)
    ids = table.column(ENTITY).to_numpy(zero_copy_only=False)
    # The last row of each entity in that order: np.unique on the reversed ids finds each first.
    _, last_from_end = np.unique(ids[::-1], return_index=True)
    keep = np.sort(len(ids) - 1 - last_from_end)
    kept = table.take(pa.array(keep, type=pa.int64()))
    x = np.stack([kept.column(c).to_numpy(zero_copy_only=False) for c in columns], axis=1)
    raw = invert_all(transforms_from_dicts(feature_set.manifest.transforms), x, columns)
    whole = whole_number_columns(feature_set)
    values: dict[str, Any] = {ENTITY_COLUMN: kept.column(ENTITY)}
    for column in feature_set.manifest.model_inputs:
        if RAW_PREFIX + column in kept.column_names:  # an encoded column: the source's values, kept
            values[column] = kept.column(RAW_PREFIX + column)
            continue
        i = columns.index(column)
        values[column] = pa.array(np.round(raw[:, i]).astype(np.int64) if column in whole else raw[:, i])
    return pa.table(values)


def materialize(feature_set: FeatureSet, store: OnlineStore) -> int:
    """Write ``feature_set``'s latest vector per entity into ``store``; the number of entities."""
    latest = latest_per_entity(feature_set)
    store.write(feature_set, latest)
    return latest.num_rows


_SQL_TYPES = {"int64": "INTEGER", "double": "REAL", "string": "TEXT", "large_string": "TEXT"}


def _table_name(name: str) -> str:
    return "features_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class SqliteOnlineStore:
    """The online store in one SQLite file (the embedded default): a table per feature set, keyed
    by entity id; ``write`` swaps the whole table in one transaction."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._connection: sqlite3.Connection | None = None
        self._schemas: dict[str, pa.Schema] = {}

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for a write
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def write(self, feature_set: FeatureSet, latest: pa.Table) -> None:
        db = self._connect()
        table, staging = _table_name(feature_set.name), _table_name(feature_set.name) + "__new"
        columns = [
            f"{_quoted(field.name)} {_SQL_TYPES.get(str(field.type), 'REAL')}" for field in latest.schema
        ]
        columns[0] += " PRIMARY KEY"
        rows = zip(*(latest.column(i).to_pylist() for i in range(latest.num_columns)), strict=True)
        marks = ", ".join("?" * latest.num_columns)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(f"DROP TABLE IF EXISTS {_quoted(staging)}")
            db.execute(f"CREATE TABLE {_quoted(staging)} ({', '.join(columns)})")
            db.executemany(f"INSERT INTO {_quoted(staging)} VALUES ({marks})", rows)
            db.execute(f"DROP TABLE IF EXISTS {_quoted(table)}")
            db.execute(f"ALTER TABLE {_quoted(staging)} RENAME TO {_quoted(table)}")
            db.execute(
                "CREATE TABLE IF NOT EXISTS materialized "
                "(name TEXT PRIMARY KEY, version TEXT, entities INTEGER)"
            )
            db.execute(
                "INSERT OR REPLACE INTO materialized VALUES (?, ?, ?)",
                (feature_set.name, feature_set.version, latest.num_rows),
            )
            db.execute("COMMIT")
            self._schemas.pop(table, None)
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def version(self, name: str) -> str | None:
        """The version of feature set ``name`` the store holds (None: not materialized)."""
        db = self._connect()
        try:
            found = db.execute("SELECT version FROM materialized WHERE name = ?", (name,)).fetchone()
        except sqlite3.OperationalError:  # nothing materialized yet
            return None
        return str(found[0]) if found else None

    def get(self, name: str, entity_ids: Sequence[Any]) -> pa.Table:
        db = self._connect()
        table = _table_name(name)
        try:
            cursor = db.execute(
                f"SELECT * FROM {_quoted(table)} WHERE {_quoted(ENTITY_COLUMN)} IN "
                f"({', '.join('?' * len(entity_ids))})",
                [_plain(i) for i in entity_ids],
            )
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise UserError(
                    f"the online store {self.path} holds no feature set '{name}': run "
                    f"`raylens features materialize {name}` first"
                ) from None
            raise
        found = {row[0]: row for row in cursor.fetchall()}
        missing = (None,) * len(cursor.description)
        rows = [found.get(_plain(i), missing) for i in entity_ids]
        names = tuple(d[0] for d in cursor.description)
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
        try:
            schema = self._schema(table, names)
            arrays = [
                pa.array(values, type=field.type) for values, field in zip(columns, schema, strict=True)
            ]
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # another process wrote other types since
            self._schemas.pop(table, None)
            schema = self._schema(table, names)
            arrays = [
                pa.array(values, type=field.type) for values, field in zip(columns, schema, strict=True)
            ]
        arrays[0] = pa.array([_plain(i) for i in entity_ids])
        return pa.Table.from_arrays(arrays, names=list(names))

    def _schema(self, table: str, names: tuple[str, ...]) -> pa.Schema:
        """The Arrow types of ``table``'s columns, from their declared SQLite types (read once per
        set of columns)."""
        cached = self._schemas.get(table)
        if cached is None or tuple(cached.names) != names:
            pragma = self._connect().execute(f"PRAGMA table_info({_quoted(table)})")
            declared = {row[1]: row[2] for row in pragma}
            types = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}
            cached = pa.schema([(n, types.get(declared.get(n, "REAL"), pa.float64())) for n in names])
            self._schemas[table] = cached
        return cached


def _plain(value: Any) -> Any:
    """An id as SQLite takes it (NumPy scalars as Python ones)."""
    return value.item() if hasattr(value, "item") else value
