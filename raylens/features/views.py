"""Feature views: tables of feature values by entity and time, joined to the rows point-in-time.

Each row (entity, event time, label) gets, from each view, the values of the view's latest row for
the same entity at or before the row's event time; a value that arrived later is never used (a
plain join on the entity would leak the future into training). The join is Arrow's own as-of join
(``pyarrow.Table.join_asof``, Acero), not a hand-written one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from raylens.errors import UserError, did_you_mean
from raylens.features.config import DataConfig, FeatureView
from raylens.features.sources import RawData, load_source

_ANY_EARLIER = -(2**62)
"""The as-of join's tolerance: a value from any time before the row's."""
ORDER = "__source_row__"


def _times(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    """The column of times ``name`` as int64 (timestamps in their unit, dates in days), checked."""
    if name not in table.column_names:
        raise UserError(
            f"{where}: column '{name}' is not in the data{did_you_mean(name, table.column_names)}; "
            f"columns are: {', '.join(table.column_names[:30])}"
        )
    column = table.column(name)
    if pa.types.is_timestamp(column.type):
        column = pc.cast(column, pa.timestamp("us", tz=column.type.tz)).cast(pa.int64())
    elif pa.types.is_date(column.type):
        column = pc.cast(pc.cast(column, pa.date32()), pa.int32()).cast(pa.int64()).combine_chunks()
        column = pa.chunked_array([pc.multiply(column, 86_400_000_000)])  # days in microseconds
    elif pa.types.is_integer(column.type):
        column = column.cast(pa.int64())
    else:
        raise UserError(
            f"{where}: column '{name}' has type {column.type}, and its times must be timestamps, dates or "
            "integers; write them as ISO 8601 (2024-05-01T12:00:00), which CSV and Parquet read as timestamps"
        )
    if column.null_count:
        raise UserError(
            f"{where}: column '{name}' has {column.null_count} missing times; every row needs one"
        )
    return column


def _view_table(
    view: FeatureView, index: int, entity: str, base_dir: Path | None
) -> tuple[RawData, pa.Table]:
    where = f"data.views[{index}]"
    raw = load_source(view.source, base_dir)
    table = raw.table
    key = view.entity or entity
    if key not in table.column_names:
        raise UserError(
            f"{where}.entity: column '{key}' is not in {view.source}{did_you_mean(key, table.column_names)}; "
            f"columns are: {', '.join(table.column_names[:30])}"
        )
    features = view.features or [c for c in table.column_names if c not in (key, view.time)]
    for name in features:
        if name not in table.column_names:
            raise UserError(
                f"{where}.features: column '{name}' is not in {view.source}"
                f"{did_you_mean(name, table.column_names)}"
            )
    times = _times(table, view.time, f"{where}.time")
    joined = pa.table(
        {entity: table.column(key), "__asof__": times, **{f: table.column(f) for f in features}}
    )
    return raw, joined


def join_views(raw: RawData, data: DataConfig, base_dir: Path | None = None) -> RawData:
    """``raw`` with every view's features joined as of each row's event time, in the source's row
    order, and a fingerprint covering the views' sources too. ``raw`` itself without views."""
    if not data.views:
        return raw
    assert data.entity is not None and data.event_time is not None  # the config's own check
    table = raw.table
    if data.entity not in table.column_names:
        raise UserError(
            f"data.entity: column '{data.entity}' is not in the data"
            f"{did_you_mean(data.entity, table.column_names)}"
        )
    times = _times(table, data.event_time, "data.event_time")
    left = table.append_column("__asof__", times).append_column(
        ORDER, pa.array(range(table.num_rows), pa.int64())
    )
    fingerprints = [raw.fingerprint]
    for index, view in enumerate(data.views):
        view_raw, right = _view_table(view, index, data.entity, base_dir)
        fingerprints.append(view_raw.fingerprint)
        clashes = [c for c in right.column_names[2:] if c in left.column_names]
        if clashes:
            raise UserError(
                f"data.views[{index}]: column '{clashes[0]}' of {view.source} is already a column of "
                "the rows; rename it in the view, or leave it out of the view's features"
            )
        if right.column(data.entity).type != left.column(data.entity).type:
            try:
                right = right.set_column(0, data.entity, right.column(0).cast(left.column(data.entity).type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise UserError(
                    f"data.views[{index}]: the entity ids of {view.source} are {right.column(0).type} "
                    f"and the rows' are {left.column(data.entity).type}; store them with one type"
                ) from None
        left = left.sort_by("__asof__").join_asof(
            right.sort_by("__asof__"),
            on="__asof__",
            by=data.entity,
            tolerance=_ANY_EARLIER,
        )
    joined = left.sort_by(ORDER).drop_columns(["__asof__", ORDER])
    return RawData(joined, raw.uri, combined_fingerprint(fingerprints))


def combined_fingerprint(fingerprints: list[str]) -> str:
    """The fingerprint of rows joined from several sources (the rows', then each view's)."""
    return "views:" + hashlib.sha256("+".join(fingerprints).encode()).hexdigest()[:32]


def views_fingerprint(data: DataConfig, base_dir: Path | None = None) -> str | None:
    """What ``join_views`` would fingerprint the joined rows with, from the sources' bytes alone
    (None where a source cannot be fingerprinted without loading it)."""
    from raylens.features.sources import source_fingerprint

    fingerprints = [source_fingerprint(data.source, base_dir)]
    fingerprints += [source_fingerprint(view.source, base_dir) for view in data.views]
    if any(f is None for f in fingerprints):
        return None
    known = [f for f in fingerprints if f is not None]
    return combined_fingerprint(known) if data.views else known[0]
