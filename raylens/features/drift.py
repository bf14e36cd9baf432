"""What changed between two versions of a feature set: the schema, the task, and each feature
column's distribution (the population stability index and the two-sample Kolmogorov-Smirnov
statistic of its raw values on the training split).

Pure functions over stored versions, returning values: ``raylens features diff`` prints them, and
a continuous-training check can judge them against thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raylens.features.store import FeatureSet
from raylens.features.transforms import invert_all, transforms_from_dicts

if TYPE_CHECKING:
    import pandas as pd

BINS = 10
"""PSI's bins: the deciles of the first version's values."""
PSI_MODERATE, PSI_MAJOR = 0.1, 0.25
"""The usual reading of PSI: under 0.1 stable, up to 0.25 a moderate shift, above it a major one."""


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = BINS) -> float:
    """The population stability index of ``actual`` against ``expected``: sum over the bins of
    (a - e) ln(a / e), with the bins cut at ``expected``'s quantiles (a constant column has one
    bin on each side of its value) and empty bins counted as half a row."""
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    if len(expected) == 0 or len(actual) == 0:
        return float("nan")
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1)
    e_share = np.maximum(e, 0.5) / len(expected)
    a_share = np.maximum(a, 0.5) / len(actual)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))


def ks_statistic(first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov statistic (the largest gap between the two empirical
    distribution functions) and its p-value (SciPy's ``ks_2samp``)."""
    from scipy.stats import ks_2samp

    if len(first) == 0 or len(second) == 0:
        return float("nan"), float("nan")
    result = ks_2samp(first, second)
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    psi: float
    ks: float
    ks_pvalue: float
    mean_before: float
    mean_after: float

    @property
    def verdict(self) -> str:
        if math.isnan(self.psi):  # no rows to compare
            return "n/a"
        return "major" if self.psi > PSI_MAJOR else "moderate" if self.psi > PSI_MODERATE else "stable"


@dataclass(frozen=True)
class FeatureSetDiff:
    """Version ``before`` → version ``after`` of one feature set (or of two)."""

    before: str
    after: str
    added: list[str]
    """Source columns the second version has and the first has not."""
    removed: list[str]
    retyped: list[tuple[str, str, str]]
    """(column, type before, type after) of the source columns both have."""
    changes: list[str]
    """Other differences in words: the task, the target, the classes, the feature columns, the
    transforms, the split."""
    drift: list[ColumnDrift]
    """The feature columns both versions have, most drifted first."""
    rows: tuple[dict[str, int], dict[str, int]]

    @property
    def schema_changed(self) -> bool:
        return bool(self.added or self.removed or self.retyped)


def whole_number_columns(feature_set: FeatureSet) -> set[str]:
    """The feature columns the source holds as integers or booleans."""
    import pyarrow as pa

    whole = set()
    for column in feature_set.feature_columns:
        try:
            kind = pa.type_for_alias(feature_set.manifest.raw_schema.get(column, "double"))
        except ValueError:  # a type without a short alias: not a whole-number one
            continue
        if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
            whole.add(column)
    return whole


def raw_training_values(feature_set: FeatureSet) -> dict[str, np.ndarray]:
    """Each feature column's values on the training split, transformed back to the source's
    (whole-number columns rounded back to whole numbers: the bins' edges fall on them)."""
    train = feature_set.read("train")
    columns = feature_set.feature_columns
    raw = invert_all(transforms_from_dicts(feature_set.manifest.transforms), train.x, columns)
    whole = whole_number_columns(feature_set)
    return {column: np.round(raw[:, i]) if column in whole else raw[:, i] for i, column in enumerate(columns)}


def raw_rows(feature_set: FeatureSet, split: str) -> tuple[pd.DataFrame, np.ndarray]:
    """A split's rows as a model built on ``feature_set`` takes them (its input columns, with the
    source's types), and their encoded targets: the fitted transforms undone, an encoded column's
    own values taken from beside the features. ``UserError`` when an encoding cannot be undone
    (its values are kept only where the spec names ``data.entity``)."""
    import pandas as pd
    import pyarrow as pa

    from raylens.errors import UserError
    from raylens.features.encoders import encoders_from_dicts
    from raylens.features.store import RAW_PREFIX

    manifest = feature_set.manifest
    arrays = feature_set.read(split)
    columns = feature_set.feature_columns
    inverted = invert_all(transforms_from_dicts(manifest.transforms), arrays.x, columns)
    whole = whole_number_columns(feature_set)
    values: dict[str, np.ndarray] = {}
    for i, column in enumerate(columns):
        values[column] = np.round(inverted[:, i]) if column in whole else inverted[:, i]
    encoded: dict[str, set[str]] = {}
    for encoder in encoders_from_dicts(manifest.encoders or []):
        encoded.setdefault(encoder.column, set()).add(encoder.kind)
    kept = feature_set.read_keys(split) if manifest.entity is not None else None
    keys = {c: kept.column(c).to_numpy(zero_copy_only=False) for c in kept.column_names} if kept else {}
    frame = {}
    for column in manifest.model_inputs:
        kinds = encoded.get(column, set())
        if RAW_PREFIX + column in keys:  # the source's own values, kept beside the features
            frame[column] = keys[RAW_PREFIX + column]
        elif kinds - {"indicator"}:
            raise UserError(
                f"feature set '{feature_set.name}' ({feature_set.version}) encodes column '{column}' and "
                "keeps its own values only for a spec with data.entity; name the entity column to compare "
                "models on its rows"
            )
        else:
            kind = pa.type_for_alias(manifest.raw_schema[column]).to_pandas_dtype()
            raw = values[column]
            if "indicator" in kinds:  # the imputed value goes back to missing where it was
                raw = np.where(values[f"{column}:missing"] > 0.5, np.nan, raw)
                kind = np.float64
            frame[column] = raw.astype(kind)
    return pd.DataFrame(frame), arrays.y


def diff_feature_sets(before: FeatureSet, after: FeatureSet) -> FeatureSetDiff:
    a, b = before.manifest, after.manifest
    added = [c for c in b.raw_schema if c not in a.raw_schema]
    removed = [c for c in a.raw_schema if c not in b.raw_schema]
    retyped = [
        (c, a.raw_schema[c], b.raw_schema[c])
        for c in a.raw_schema
        if c in b.raw_schema and a.raw_schema[c] != b.raw_schema[c]
    ]
    changes = []
    for what, first, second in (
        ("target", a.target, b.target),
        ("task", a.task, b.task),
        ("classes", a.classes, b.classes),
        ("feature columns", a.feature_columns, b.feature_columns),
        ("transforms", [t["kind"] for t in a.transforms], [t["kind"] for t in b.transforms]),
        ("split", a.split.model_dump(), b.split.model_dump()),
    ):
        if first != second:
            changes.append(f"{what}: {first} → {second}")
    if a.source.fingerprint != b.source.fingerprint:
        changes.append(
            f"source: {a.source.uri} ({a.source.fingerprint}) → {b.source.uri} ({b.source.fingerprint})"
        )
    first_values, second_values = raw_training_values(before), raw_training_values(after)
    drift = []
    for column in (c for c in a.feature_columns if c in second_values):
        x, y = first_values[column], second_values[column]
        ks, pvalue = ks_statistic(x, y)
        drift.append(
            ColumnDrift(
                column,
                psi(x, y),
                ks,
                pvalue,
                float(x.mean()) if len(x) else float("nan"),
                float(y.mean()) if len(y) else float("nan"),
            )
        )
    drift.sort(key=lambda d: 0.0 if math.isnan(d.psi) else -d.psi)
    return FeatureSetDiff(
        f"{before.name}@{before.version}",
        f"{after.name}@{after.version}",
        added,
        removed,
        retyped,
        changes,
        drift,
        (dict(a.rows), dict(b.rows)),
    )
