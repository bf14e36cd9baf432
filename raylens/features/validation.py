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


def _mask_rows(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    filled = pc.fill_null(mask, False)
    return np.flatnonzero(np.asarray(filled.to_numpy(zero_copy_only=False), dtype=bool))


def _type_ok(t: pa.DataType, kind: str) -> bool:
    return {
        "number": pa.types.is_integer(t) or pa.types.is_floating(t),
        "integer": pa.types.is_integer(t),
        "string": pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t),
        "bool": pa.types.is_boolean(t),
        "timestamp": pa.types.is_timestamp(t) or pa.types.is_date(t),
    }[kind]


def _rule_checks(name: str, column: pa.Array | pa.ChunkedArray, rule: ColumnRule) -> list[Violation]:
    """Each check ``rule`` makes of one batch's ``column``, broken or not, always in the same
    order; a uniqueness check's rows are left empty (only the whole column can tell)."""
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
        found.append(Violation(name, UNIQUE, np.empty(0, dtype=np.int64)))
    return found


UNIQUE = "a repeated value"


def _repeated(values: np.ndarray) -> np.ndarray:
    """Rows holding a value an earlier row holds."""
    _, first = np.unique(values.astype(str) if values.dtype == object else values, return_index=True)
    return np.setdiff1d(np.arange(len(values)), first)


def _builtin_checks(batch: pa.RecordBatch, data: DataConfig, allow_missing: set[str]) -> list[Violation]:
    """What prepare refuses, as checks: a numeric feature or the target null, NaN or infinite
    (set aside under quarantine instead of failing the build); a missing value is no violation
    in ``allow_missing`` (columns an impute transform fills)."""
    from raylens.features.prepare import candidate_features

    found = []
    for name in [*candidate_features(batch.schema.names, data), data.target]:
        if name not in batch.schema.names:
            continue
        column = batch.column(name)
        if (
            not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type))
            and name != data.target
        ):
            continue
        if name not in allow_missing:
            found.append(Violation(name, "null or NaN", _mask_rows(pc.is_null(column, nan_is_null=True))))
        if pa.types.is_floating(column.type):
            found.append(Violation(name, "infinite", _mask_rows(pc.is_inf(column))))
    return found


@dataclass(frozen=True)
class Verdict:
    """Which source rows are set aside, and why (``bad`` None: every row is kept)."""

    rows: int
    labels: list[str] = field(default_factory=list)
    reasons: np.ndarray | None = None
    """Per source row, its reason's index in ``labels`` (-1: kept)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Rows set aside per reason (``column: rule``)."""

    @property
    def kept(self) -> int:
        return self.rows if self.reasons is None else int((self.reasons < 0).sum())

    def keep(self, offset: int, rows: int) -> np.ndarray | None:
        """Which of the source rows ``offset`` .. ``offset + rows`` are kept (None: all)."""
        return None if self.reasons is None else self.reasons[offset : offset + rows] < 0

    def set_aside(self, batch: pa.RecordBatch, offset: int) -> pa.RecordBatch | None:
        """The rows of ``batch`` (source rows from ``offset``) set aside, each with its reason."""
        if self.reasons is None:
            return None
        codes = self.reasons[offset : offset + batch.num_rows]
        bad = codes >= 0
        if not bad.any():
            return None
        reasons = pa.array([self.labels[c] for c in codes[bad]], pa.string())
        aside = batch.filter(pa.array(bad))
        return pa.RecordBatch.from_arrays([*aside.columns, reasons], names=[*aside.schema.names, REASON])


class RowChecks:
    """The spec's rules over a source read batch by batch: ``add`` every batch in order, then
    ``verdict``. The schema's checks (a rule's column missing, or of another type) raise at once."""

    def __init__(self, schema: pa.Schema, data: DataConfig, allow_missing: set[str] | None = None) -> None:
        config = data.validation
        for name, rule in config.columns.items():
            if name not in schema.names:
                raise UserError(
                    f"data.validation.columns: column '{name}' is not in the data; columns are: "
                    f"{', '.join(schema.names[:30])}"
                )
            type_ = schema.field(name).type
            if rule.type is not None and not _type_ok(type_, rule.type):
                raise UserError(
                    f"data.validation: column '{name}' has type {type_}, not {rule.type} as the spec "
                    "declares; fix the source or the declared type"
                )
        self._data = data
        self._allow_missing = allow_missing or set()
        self._rows = 0
        self._found: list[tuple[str, str, list[np.ndarray]]] = []
        """Every check, in order: its column, its rule, the rows breaking it in each batch."""
        self._unique: dict[str, list[np.ndarray]] = {
            name: [] for name, rule in config.columns.items() if rule.unique
        }

    def add(self, batch: pa.RecordBatch) -> None:
        checks: list[Violation] = []
        for name, rule in self._data.validation.columns.items():
            checks += _rule_checks(name, batch.column(name), rule)
        if self._data.validation.on_invalid == "quarantine":
            checks += _builtin_checks(batch, self._data, self._allow_missing)
        if not self._found:
            self._found = [(check.column, check.rule, []) for check in checks]
        for (_, _, rows), check in zip(self._found, checks, strict=True):
            if len(check.rows):
                rows.append(check.rows + self._rows)
        for name, values in self._unique.items():
            values.append(batch.column(name).to_numpy(zero_copy_only=False))
        self._rows += batch.num_rows

    def verdict(self) -> Verdict:
        """Fail on the first broken rule, or say which rows are set aside."""
        violations = []
        for column, rule, parts in self._found:
            if rule == UNIQUE:
                rows = _repeated(np.concatenate(self._unique[column]))
            else:
                rows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
            if len(rows):
                violations.append(Violation(column, rule, rows))
        if not violations:
            return Verdict(self._rows)
        if self._data.validation.on_invalid == "fail":
            first = violations[0]
            rows_shown = ", ".join(str(r) for r in first.rows[:5]) + (", ..." if len(first.rows) > 5 else "")
            raise UserError(
                f"data.validation: column '{first.column}' has {len(first.rows)} rows {first.rule} "
                f"(rows {rows_shown}); fix the data, change the rule, or set data.validation.on_invalid: "
                "quarantine to set such rows aside"
            )
        reasons = np.full(self._rows, -1, dtype=np.int32)
        labels: list[str] = []
        counts: dict[str, int] = {}
        for violation in violations:
            label = f"{violation.column}: {violation.rule}"
            fresh = violation.rows[reasons[violation.rows] < 0]
            if len(fresh):
                if label not in counts:
                    labels.append(label)
                    counts[label] = 0
                reasons[fresh] = labels.index(label)
                counts[label] += len(fresh)
        if (reasons >= 0).all():
            raise UserError(
                f"data.validation: every one of the {self._rows} rows breaks a rule "
                f"({', '.join(f'{k}: {v}' for k, v in counts.items())}); nothing is left to train on"
            )
        return Verdict(self._rows, labels, reasons, counts)
