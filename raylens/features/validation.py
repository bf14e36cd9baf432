"""Data validation: the spec's rules per column (type, range, allowed values, nulls, ±inf,
uniqueness), checked on every source row before anything is prepared, and what becomes of the
rows that break them: the build fails naming the column, the rule and the first rows, or (with
``on_invalid: quarantine``) they are set aside into a side table that is counted, kept with the
version and shown.

With quarantine, the rows prepare would refuse anyway (a feature or the target missing or
infinite) are set aside too, each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylens.errors import UserError
from raylens.features.config import ColumnRule, DataConfig

REASON = "__reason__"
"""The quarantine table's column saying why each row was set aside."""


@dataclass(frozen=True)
class Violation:
    column: str
    rule: str
    """What the rows broke, in words (``outside [0, 120]``, ``null``, ``a duplicate id``)."""
    rows: np.ndarray
    """Source row numbers."""


@dataclass(frozen=True)
class Validated:
    """The rows that passed, and what was set aside (empty when nothing was)."""

    table: pa.Table
    quarantined: pa.Table | None
    counts: dict[str, int] = field(default_factory=dict)
    """Rows set aside per reason (``column: rule``)."""


def _mask_rows(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    filled = pc.fill_null(mask, False)
    return np.flatnonzero(np.asarray(filled.to_numpy(zero_copy_only=False), dtype=bool))


def _type_ok(column: pa.ChunkedArray, kind: str) -> bool:
    t = column.type
    return {
        "number": pa.types.is_integer(t) or pa.types.is_floating(t),
        "integer": pa.types.is_integer(t),
        "string": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t),
        "bool": pa.types.is_boolean(t),
        "timestamp": pa.types.is_timestamp(t) or pa.types.is_date(t),
    }[kind]


def _rule_violations(name: str, column: pa.ChunkedArray, rule: ColumnRule) -> list[Violation]:
    found = []
    numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
    if not rule.nullable:
        missing = pc.is_null(column, nan_is_null=True)
        found.append(Violation(name, "null or NaN", _mask_rows(missing)))
    if pa.types.is_floating(column.type):
        found.append(Violation(name, "infinite", _mask_rows(pc.is_inf(column))))
    if rule.min is not None and numeric:
        found.append(Violation(name, f"below {rule.min:g}", _mask_rows(pc.less(column, rule.min))))
    if rule.max is not None and numeric:
        found.append(Violation(name, f"above {rule.max:g}", _mask_rows(pc.greater(column, rule.max))))
    if rule.allowed is not None:
        allowed = (
            pa.array(rule.allowed).cast(column.type) if numeric else pa.array([str(v) for v in rule.allowed])
        )
        outside = pc.invert(pc.is_in(column if numeric else pc.cast(column, pa.string()), value_set=allowed))
        shown = ", ".join(str(v) for v in rule.allowed[:10])
        found.append(
            Violation(name, f"not one of {shown}", _mask_rows(pc.and_(outside, pc.is_valid(column))))
        )
    if rule.unique:
        values = column.to_numpy(zero_copy_only=False)
        _, first = np.unique(values.astype(str) if values.dtype == object else values, return_index=True)
        repeated = np.setdiff1d(np.arange(len(values)), first)
        found.append(Violation(name, "a repeated value", repeated))
    return [v for v in found if len(v.rows)]


def _builtin_violations(table: pa.Table, data: DataConfig, allow_missing: set[str]) -> list[Violation]:
    """What prepare refuses, as violations: a numeric feature or the target null, NaN or
    infinite (set aside under quarantine instead of failing the build); a missing value is no
    violation in ``allow_missing`` (columns an impute transform fills)."""
    from raylens.features.prepare import candidate_features

    found = []
    for name in [*candidate_features(table.column_names, data), data.target]:
        if name not in table.column_names:
            continue
        column = table.column(name)
        if (
            not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type))
            and name != data.target
        ):
            continue
        if name not in allow_missing:
            found.append(Violation(name, "null or NaN", _mask_rows(pc.is_null(column, nan_is_null=True))))
        if pa.types.is_floating(column.type):
            found.append(Violation(name, "infinite", _mask_rows(pc.is_inf(column))))
    return [v for v in found if len(v.rows)]


def validate(table: pa.Table, data: DataConfig, allow_missing: set[str] | None = None) -> Validated:
    """Check ``table`` against ``data.validation``: fail on the first broken rule, or set the rows
    that break any aside."""
    config = data.validation
    violations: list[Violation] = []
    for name, rule in config.columns.items():
        if name not in table.column_names:
            raise UserError(
                f"data.validation.columns: column '{name}' is not in the data; columns are: "
                f"{', '.join(table.column_names[:30])}"
            )
        column = table.column(name)
        if rule.type is not None and not _type_ok(column, rule.type):
            raise UserError(
                f"data.validation: column '{name}' has type {column.type}, not {rule.type} as the spec "
                "declares; fix the source or the declared type"
            )
        violations += _rule_violations(name, column, rule)
    if config.on_invalid == "fail":
        if violations:
            first = violations[0]
            rows = ", ".join(str(r) for r in first.rows[:5]) + (", ..." if len(first.rows) > 5 else "")
            raise UserError(
                f"data.validation: column '{first.column}' has {len(first.rows)} rows {first.rule} "
                f"(rows {rows}); fix the data, change the rule, or set data.validation.on_invalid: "
                "quarantine to set such rows aside"
            )
        return Validated(table, None)
    violations += _builtin_violations(table, data, allow_missing or set())
    if not violations:
        return Validated(table, None)
    reasons = np.full(table.num_rows, "", dtype=object)
    counts: dict[str, int] = {}
    for violation in violations:
        label = f"{violation.column}: {violation.rule}"
        fresh = violation.rows[reasons[violation.rows] == ""]
        reasons[fresh] = label
        if len(fresh):
            counts[label] = len(fresh)
    bad = reasons != ""
    if bad.all():
        raise UserError(
            f"data.validation: every one of the {table.num_rows} rows breaks a rule "
            f"({', '.join(f'{k}: {v}' for k, v in counts.items())}); nothing is left to train on"
        )
    kept = table.filter(pa.array(~bad))
    aside = table.filter(pa.array(bad)).append_column(REASON, pa.array(reasons[bad].tolist(), pa.string()))
    return Validated(kept, aside, counts)
