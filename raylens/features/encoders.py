"""Encodings: source columns (strings, categories, numbers to bucket) into numeric features.

They run before the numeric transforms, on the source's own columns, and are fitted on the
training split only. Like the transforms they are plain data stored with the feature set, so the
registered model encodes a request's raw columns exactly as the rows it trained on were encoded.

Each encoded source column is replaced, in its place, by its features: ``color`` by
``color=red``, ``color=blue``, ``color=<other>`` (one_hot); by ``color`` holding 1, 2, ... (ordinal,
0 for a category training never saw); by ``color#0`` ... ``color#31`` (hashing); a numeric
``age`` by ``age`` holding its bucket (bucketize). An impute step with ``indicator`` adds
``age:missing`` right after its column.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylens.errors import UserError
from raylens.features.config import (
    DEFAULT_MAX_CATEGORIES,
    BucketizeStep,
    FeaturesConfig,
    HashingStep,
    ImputeStep,
    OneHotStep,
    OrdinalStep,
    encoded_columns,
)

OTHER = "<other>"
"""The one-hot category of values beyond ``max_categories``, never seen in training, or missing."""
ENCODER_KINDS = ("one_hot", "ordinal", "hashing", "bucketize", "indicator")

Values: TypeAlias = pa.Array | pa.ChunkedArray


@dataclass(frozen=True)
class FittedEncoder:
    """One source column's encoding, fitted: ``outputs()`` are the features ``encode`` returns."""

    kind: str
    column: str
    categories: list[Any] = field(default_factory=list)
    """one_hot: the kept categories, most frequent first; ordinal: every category, sorted."""
    buckets: int = 0
    """hashing: features per column."""
    boundaries: list[float] = field(default_factory=list)
    """bucketize: the bucket edges, increasing."""

    def outputs(self) -> list[str]:
        if self.kind == "one_hot":
            return [f"{self.column}={c}" for c in self.categories] + [f"{self.column}={OTHER}"]
        if self.kind == "hashing":
            return [f"{self.column}#{i}" for i in range(self.buckets)]
        if self.kind == "indicator":
            return [f"{self.column}:missing"]
        return [self.column]

    def encode(self, values: Values) -> list[np.ndarray]:
        """The features of ``values`` (this encoder's column), float32, one array per output."""
        if self.kind == "indicator":
            missing = values.is_null(nan_is_null=True)
            return [_numpy(missing).astype(np.float32)]
        if self.kind == "bucketize":
            numbers = _numbers(values, self.column)
            buckets = np.searchsorted(np.asarray(self.boundaries), numbers, side="right").astype(np.float32)
            return [np.where(np.isnan(numbers), np.float32(np.nan), buckets)]
        if self.kind == "hashing":
            index = _hashed(values, self.buckets)
            return _one_hot(index, self.buckets)
        index = _index_in(values, self.categories)  # -1: unseen or missing
        if self.kind == "ordinal":
            return [(index + 1).astype(np.float32)]
        return _one_hot(np.where(index < 0, len(self.categories), index), len(self.categories) + 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ([], 0) or k in ("kind", "column")}


def encoders_from_dicts(items: Sequence[Mapping[str, Any]]) -> list[FittedEncoder]:
    """Rebuild fitted encoders from a manifest (or a registered model's spec)."""
    encoders = []
    for item in items:
        if item.get("kind") not in ENCODER_KINDS:
            raise ValueError(f"unknown fitted encoder {item.get('kind')!r}")
        encoders.append(
            FittedEncoder(
                str(item["kind"]),
                str(item["column"]),
                categories=list(item.get("categories", [])),
                buckets=int(item.get("buckets", 0)),
                boundaries=[float(b) for b in item.get("boundaries", [])],
            )
        )
    return encoders


def check_encodings(features: FeaturesConfig, schema: pa.Schema, input_columns: list[str]) -> None:
    """Refuse an encoding of a column that is no feature, a column encoded twice, or a column of
    a type the encoding cannot take: before any row is read."""
    seen: dict[str, str] = {}
    for step in features.encodings:
        kind = _kind(step)
        for column in encoded_columns(step):
            if column not in input_columns:
                raise UserError(
                    f"features.transforms: {kind} names '{column}', which is not a feature column of the "
                    f"source; feature columns are: {', '.join(input_columns[:20])}"
                )
            if column in seen:
                raise UserError(
                    f"features.transforms: '{column}' is encoded twice ({seen[column]} and {kind}); "
                    "keep one encoding per column"
                )
            seen[column] = kind
            type_ = schema.field(column).type
            numeric = pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_null(type_)
            if kind == "bucketize" and not numeric:
                raise UserError(
                    f"features.transforms: bucketize of '{column}', a column of {type_}; "
                    "bucketize takes numbers: one_hot, ordinal or hashing take categories"
                )
            if kind in ("one_hot", "ordinal") and pa.types.is_floating(type_):
                raise UserError(
                    f"features.transforms: {kind} of '{column}', a column of decimal numbers ({type_}); "
                    "categories are strings, whole numbers or booleans: bucketize it instead"
                )


def fit_encoders(features: FeaturesConfig, train: pa.Table, input_columns: list[str]) -> list[FittedEncoder]:
    """Fit the spec's encodings (and impute indicators) on the training rows of the source."""
    check_encodings(features, train.schema, input_columns)
    fitted: list[FittedEncoder] = []
    for step in features.encodings:
        kind = _kind(step)
        for column in encoded_columns(step):
            fitted.append(_fit(step, kind, column, train.column(column)))
    for impute in features.transforms:
        if isinstance(impute, ImputeStep) and impute.impute.indicator:
            chosen = impute.impute.columns
            for column in input_columns if chosen == "*" else chosen:
                if column in input_columns:
                    fitted.append(FittedEncoder("indicator", column))
    return fitted


def _per_column(
    encoders: Sequence[FittedEncoder], input_columns: list[str]
) -> list[tuple[str, FittedEncoder | None, list[FittedEncoder]]]:
    """Each input column in order, with its encoding (None: passed through) and its indicators."""
    by_column: dict[str, list[FittedEncoder]] = {}
    for encoder in encoders:
        by_column.setdefault(encoder.column, []).append(encoder)
    layout = []
    for column in input_columns:
        own = by_column.get(column, [])
        encoding = next((e for e in own if e.kind != "indicator"), None)
        layout.append((column, encoding, [e for e in own if e.kind == "indicator"]))
    return layout


def encoded_feature_columns(encoders: Sequence[FittedEncoder], input_columns: list[str]) -> list[str]:
    """The feature columns after encoding: each encoded column replaced by its outputs, in place,
    its indicator right after."""
    columns: list[str] = []
    for column, encoding, indicators in _per_column(encoders, input_columns):
        columns += encoding.outputs() if encoding is not None else [column]
        columns += [output for e in indicators for output in e.outputs()]
    clashing = sorted(name for name, count in Counter(columns).items() if count > 1)
    if clashing:
        raise UserError(
            f"features.transforms: the encodings make feature columns named like others "
            f"({', '.join(clashing[:5])}); rename the source columns"
        )
    return columns


def encode_columns(
    encoders: Sequence[FittedEncoder], columns: Mapping[str, Values], input_columns: list[str]
) -> dict[str, Values | np.ndarray]:
    """The feature columns, by name, from the source's ``columns``: encoded ones computed, the
    rest passed through as they are (so their checks name the source's own values)."""
    out: dict[str, Values | np.ndarray] = {}
    for column, encoding, indicators in _per_column(encoders, input_columns):
        if encoding is not None:
            out.update(zip(encoding.outputs(), encoding.encode(columns[column]), strict=True))
        else:
            out[column] = columns[column]
        for indicator in indicators:
            out.update(zip(indicator.outputs(), indicator.encode(columns[column]), strict=True))
    return out


def encode_table(encoders: Sequence[FittedEncoder], table: pa.Table, input_columns: list[str]) -> pa.Table:
    """``table`` with its ``input_columns`` replaced by the feature columns (other columns kept)."""
    encoded = encode_columns(encoders, {c: table.column(c) for c in input_columns}, input_columns)
    rest = {c: table.column(c) for c in table.column_names if c not in input_columns}
    arrays = {
        name: values if not isinstance(values, np.ndarray) else pa.array(values)
        for name, values in encoded.items()
    }
    return pa.table({**arrays, **{c: v for c, v in rest.items() if c not in arrays}})


def _kind(step: object) -> str:
    if isinstance(step, OneHotStep):
        return "one_hot"
    if isinstance(step, OrdinalStep):
        return "ordinal"
    if isinstance(step, HashingStep):
        return "hashing"
    return "bucketize"


def _fit(step: object, kind: str, column: str, values: pa.ChunkedArray) -> FittedEncoder:
    if isinstance(step, BucketizeStep):
        if step.bucketize.boundaries is not None:
            return FittedEncoder(kind, column, boundaries=list(step.bucketize.boundaries))
        numbers = _numbers(values, column)
        numbers = numbers[~np.isnan(numbers)]
        if not len(numbers):
            raise UserError(
                f"features.transforms: bucketize of '{column}': the training split holds no value there"
            )
        inner = np.quantile(numbers, np.linspace(0, 1, (step.bucketize.bins or 2) + 1)[1:-1])
        return FittedEncoder(kind, column, boundaries=[float(b) for b in np.unique(inner)])
    if isinstance(step, HashingStep):
        return FittedEncoder(kind, column, buckets=step.hashing.buckets)
    counts = pc.value_counts(values.drop_null()).to_pylist()
    if isinstance(step, OrdinalStep):
        return FittedEncoder(kind, column, categories=sorted(c["values"] for c in counts))
    assert isinstance(step, OneHotStep)
    limit = DEFAULT_MAX_CATEGORIES if isinstance(step.one_hot, list) else step.one_hot.max_categories
    frequent = sorted(counts, key=lambda c: (-c["counts"], str(c["values"])))[:limit]
    return FittedEncoder(kind, column, categories=[c["values"] for c in frequent])


def _numpy(values: Values) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False) if isinstance(values, pa.ChunkedArray | pa.Array) else values


def _numbers(values: Values, column: str) -> np.ndarray:
    """A bucketized column as float64 (missing: NaN); a request's text there is an error."""
    try:
        return _numpy(pc.cast(values, pa.float64())).astype(np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise UserError(
            f"column '{column}' holds values that are not numbers ({values.type}); it is bucketized "
            "and takes numbers"
        ) from None


def _index_in(values: Values, categories: list[Any]) -> np.ndarray:
    """Each value's place in ``categories``; -1 for a missing value or one not among them."""
    if not categories:
        return np.full(len(values), -1, dtype=np.int64)
    known = pa.array(categories)
    if values.type != known.type:
        try:
            values = pc.cast(values, known.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return np.full(len(values), -1, dtype=np.int64)
    index = pc.index_in(values, value_set=known)
    return _numpy(index.fill_null(-1)).astype(np.int64)


def _hashed(values: Values, buckets: int) -> np.ndarray:
    """Each value's bucket by a hash of its text that is the same in every process (Python's own
    ``hash`` of a string is salted per process); -1 for a missing value."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = pc.dictionary_encode(values)
    per_value = np.array(
        [
            int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8).digest(), "little") % buckets
            for v in encoded.dictionary.to_pylist()
        ],
        dtype=np.int64,
    )
    codes = _numpy(encoded.indices.fill_null(-1)).astype(np.int64)
    return np.where(codes < 0, -1, per_value[np.maximum(codes, 0)] if len(per_value) else -1)


def _one_hot(index: np.ndarray, width: int) -> list[np.ndarray]:
    """Columns of 0/1, one per place; a row with index -1 is all zeros."""
    return [(index == i).astype(np.float32) for i in range(width)]
