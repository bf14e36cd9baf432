"""Typed configuration of the data and feature sections of an experiment spec."""

from __future__ import annotations

import difflib
import itertools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SplitConfig(_Strict):
    """Fractions of all rows held out for validation and test; the rest trains."""

    valid: float = Field(0.15, ge=0.0, lt=1.0)
    """Fraction of rows in the validation split (used every epoch and by tuning)."""
    test: float = Field(0.15, ge=0.0, lt=1.0)
    """Fraction of rows in the test split (used once, for the final evaluation)."""
    seed: int = 0
    """Seed of the shuffle: the same seed and data give the same split."""
    time: str | None = None
    """Split by this column of times (a timestamp, date or number column; it need not be a
    feature): train holds the earliest rows, valid the next, test the latest, and rows of one time
    never straddle two splits. Default: a shuffle, stratified by class for classification."""
    group: str | None = None
    """Split by this column of groups (an entity id: a customer, a patient): every row of a group
    goes to the same split, groups drawn at random by ``seed``."""

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitConfig:
        if self.valid + self.test >= 0.9:
            raise ValueError(
                f"valid + test = {self.valid + self.test:g} leaves too little to train on; keep it below 0.9"
            )
        if self.time is not None and self.group is not None:
            raise ValueError("split by time or by group, not both: set one of time and group")
        return self


class ColumnRule(_Strict):
    """What every value of one column must be."""

    type: Literal["number", "integer", "string", "bool", "timestamp"] | None = None
    """The column's type; a source whose column has another is refused whatever the policy."""
    min: float | None = None
    """The smallest allowed value (numbers)."""
    max: float | None = None
    """The largest allowed value (numbers)."""
    allowed: list[str | int | float | bool] | None = None
    """The values allowed (categories, labels); others break the rule."""
    nullable: bool = False
    """Whether a null (or NaN) is allowed."""
    unique: bool = False
    """No value twice (an entity key); the first row of a repeated value passes."""

    @model_validator(mode="after")
    def _ordered(self) -> ColumnRule:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) must not be above max ({self.max:g})")
        return self


class ValidationConfig(_Strict):
    """Rules per column, checked on every source row before anything is prepared."""

    columns: dict[str, ColumnRule] = Field(default_factory=dict)
    """Each column's rule, by column name."""
    on_invalid: Literal["fail", "quarantine"] = "fail"
    """fail: the build stops, naming the column, rule and first rows; quarantine: the rows that
    break a rule (or are missing or infinite in a feature or the target) are set aside into the
    version's quarantine.parquet, counted in its manifest, and the rest is built."""


class FeatureView(_Strict):
    """A table of feature values by entity and time (entity, feature time, values), joined to each
    row as of the row's event time: the latest value at or before it, never a later one."""

    source: str
    """A .parquet/.csv file or folder (relative to the spec's folder)."""
    time: str
    """The column of times each value holds from (a timestamp, date or integer column)."""
    entity: str | None = None
    """The view's entity column; default: the column data.entity names."""
    features: list[str] | None = None
    """The columns joined; default: every column but the entity and the time."""


class DataConfig(_Strict):
    """Where rows come from and which column is predicted."""

    source: str
    """sklearn:<name>, synthetic:<kind>[?rows=..], or a .parquet/.csv file or folder."""
    target: str
    """Name of the column to predict."""
    task: Literal["auto", "classification", "regression"] = "auto"
    """auto: a float target is regression; an integer target with at most 20 distinct values is
    classification, with more regression; a string or boolean target is classification."""
    features: list[str] | None = None
    """Columns to use as features; default: every column but the target and ``drop``."""
    drop: list[str] = Field(default_factory=list)
    """Columns to leave out (ids, timestamps, free text)."""
    entity: str | None = None
    """A column naming each row's entity (a customer id): kept with the stored rows, not a feature;
    the key of the online store (``raylens features materialize``)."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """Held-out fractions and the seed of the shuffle."""
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    """Rules per column and what becomes of the rows that break them."""
    event_time: str | None = None
    """The column with each row's event time (a timestamp, date or integer column): feature views
    are joined as of it."""
    views: list[FeatureView] = Field(default_factory=list)
    """Feature tables joined point-in-time to the rows (needs entity and event_time)."""

    @model_validator(mode="after")
    def _views_have_keys(self) -> DataConfig:
        if self.views and (self.entity is None or self.event_time is None):
            raise ValueError(
                "feature views are joined by entity as of each row's time: set entity and event_time"
            )
        return self


class StandardizeStep(_Strict):
    """Subtract the training mean and divide by the training standard deviation."""

    standardize: Literal["*"] | list[str]
    """``"*"`` for every feature column, or a list of columns."""


class MinMaxStep(_Strict):
    """Scale to [0, 1] by the training minimum and maximum."""

    min_max: Literal["*"] | list[str]
    """``"*"`` for every feature column, or a list of columns."""


class Log1pStep(_Strict):
    """log(1 + x): for counts and amounts with a long tail (values must be above -1)."""

    log1p: Literal["*"] | list[str]
    """``"*"`` for every feature column, or a list of columns."""


class ClipSettings(_Strict):
    columns: Literal["*"] | list[str]
    """``"*"`` for every feature column, or a list of columns."""
    min: float | None = None
    """The smallest value kept; smaller ones become it."""
    max: float | None = None
    """The largest value kept; larger ones become it."""

    @model_validator(mode="after")
    def _bounded(self) -> ClipSettings:
        if self.min is None and self.max is None:
            raise ValueError("clip needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) must not be above max ({self.max:g})")
        return self


class ClipStep(_Strict):
    """Limit values to [min, max]."""

    clip: ClipSettings
    """The columns and their bounds."""


class ImputeSettings(_Strict):
    columns: Literal["*"] | list[str]
    """``"*"`` for every feature column, or a list of columns; their missing values are allowed."""
    strategy: Literal["mean", "median", "constant"] = "median"
    """What a missing value becomes: the training mean or median, or ``value``."""
    value: float = 0.0
    """The value for ``constant``."""
    indicator: bool = False
    """Add a feature ``<column>:missing`` per column: 1 where the value was missing, else 0 (the
    model can tell a filled value from a measured one)."""


class ImputeStep(_Strict):
    """Fill missing values (null, NaN) of the columns, in training and in the registered model."""

    impute: ImputeSettings
    """The columns and what their missing values become."""


DEFAULT_MAX_CATEGORIES = 20


class OneHotSettings(_Strict):
    columns: list[str]
    """Categorical columns (strings, integers, booleans) of the source."""
    max_categories: int = Field(DEFAULT_MAX_CATEGORIES, ge=1, le=1000)
    """The most frequent categories of the training split get a column each; the rest, a value
    never seen in training and a missing one share ``<column>=<other>``."""


class OneHotStep(_Strict):
    """One 0/1 feature per category (``<column>=<category>``), plus ``<column>=<other>``."""

    one_hot: list[str] | OneHotSettings
    """The columns, or {columns, max_categories}."""


class OrdinalStep(_Strict):
    """One feature per column: the category's place in the sorted training categories, from 1;
    0 for a value never seen in training or a missing one."""

    ordinal: list[str]
    """Categorical columns of the source."""


class HashingSettings(_Strict):
    columns: list[str]
    """Categorical columns of the source, as many categories as they hold (ids, words)."""
    buckets: int = Field(32, ge=2, le=4096)
    """Features per column (``<column>#0`` ...): each value sets the one its stable hash picks."""


class HashingStep(_Strict):
    """The hashing trick: a fixed number of 0/1 features per column, nothing fitted, so a value
    never seen in training still lands in a bucket."""

    hashing: HashingSettings
    """The columns and the buckets per column."""


class BucketizeSettings(_Strict):
    columns: list[str]
    """Numeric columns of the source."""
    bins: int | None = Field(None, ge=2, le=1000)
    """Buckets of about equal rows, their edges the training split's quantiles."""
    boundaries: list[float] | None = None
    """Or the edges themselves, increasing: bucket 0 below the first, 1 from it to the next, ..."""

    @model_validator(mode="after")
    def _one_way(self) -> BucketizeSettings:
        if (self.bins is None) == (self.boundaries is None):
            raise ValueError(
                "bucketize needs bins (quantiles of the training split) or boundaries, one of them"
            )
        edges = self.boundaries
        if edges is not None and (not edges or any(b <= a for a, b in itertools.pairwise(edges))):
            raise ValueError("bucketize boundaries must be one or more numbers, each above the one before")
        return self


class BucketizeStep(_Strict):
    """A numeric column becomes its bucket's number (a missing value stays missing: impute it)."""

    bucketize: BucketizeSettings
    """The columns, and bins or boundaries."""


TransformStep = (
    StandardizeStep
    | MinMaxStep
    | Log1pStep
    | ClipStep
    | ImputeStep
    | OneHotStep
    | OrdinalStep
    | HashingStep
    | BucketizeStep
)
EncodingStep = OneHotStep | OrdinalStep | HashingStep | BucketizeStep
NumericStep = StandardizeStep | MinMaxStep | Log1pStep | ClipStep | ImputeStep
TRANSFORM_KINDS = (
    "standardize",
    "min_max",
    "log1p",
    "clip",
    "impute",
    "one_hot",
    "ordinal",
    "hashing",
    "bucketize",
)


class FeaturesConfig(_Strict):
    """The feature pipeline: transforms fitted on the training split only."""

    transforms: list[TransformStep] = Field(default_factory=list)
    """Each fitted on the training split only. Encodings of source columns first, wherever they
    are listed: one_hot ([columns] or {columns, max_categories}), ordinal ([columns]), hashing
    ({columns, buckets}), bucketize ({columns, bins or boundaries}). Then, in order, on the
    numeric features (``"*"``: every one no encoding made): standardize, min_max, log1p, clip
    ({columns, min, max}), impute ({columns, strategy: mean|median|constant, value, indicator})."""

    def imputed(self, feature_columns: list[str]) -> set[str]:
        """The feature columns an impute step fills: missing values are allowed there."""
        filled: set[str] = set()
        for step in self.transforms:
            if isinstance(step, ImputeStep):
                chosen = step.impute.columns
                filled |= set(feature_columns if chosen == "*" else chosen)
        return filled

    @property
    def encodings(self) -> list[EncodingStep]:
        """The steps that turn source columns into numeric features, in the order listed."""
        return [
            s
            for s in self.transforms
            if isinstance(s, OneHotStep | OrdinalStep | HashingStep | BucketizeStep)
        ]

    @property
    def categorical(self) -> set[str]:
        """Source columns a categorical encoding (one_hot, ordinal, hashing) takes: any values,
        a missing one a category of its own."""
        return {
            c for step in self.encodings if not isinstance(step, BucketizeStep) for c in encoded_columns(step)
        }

    def missing_allowed(self, feature_columns: list[str]) -> set[str]:
        """Source columns whose missing values are no error: an impute step fills them, or a
        categorical encoding takes them."""
        return self.imputed(feature_columns) | self.categorical

    @field_validator("transforms", mode="before")
    @classmethod
    def _one_known_kind_each(cls, value: object) -> object:
        # Said once per step, by name: the union's own errors list every kind's missing key.
        if value is None:
            return []
        kinds = TRANSFORM_KINDS
        for index, step in enumerate(value if isinstance(value, list) else []):
            if not isinstance(step, dict) or len(step) != 1:
                raise ValueError(
                    f"step {index + 1} must be one key, the transform: one of {', '.join(kinds)}"
                )
            (kind,) = step
            if kind not in kinds:
                close = difflib.get_close_matches(str(kind), kinds, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(
                    f"step {index + 1}: '{kind}' is not a transform{hint}; one of {', '.join(kinds)}"
                )
        return value


def encoded_columns(step: EncodingStep) -> list[str]:
    """The source columns one encoding step names."""
    if isinstance(step, OneHotStep):
        return list(step.one_hot) if isinstance(step.one_hot, list) else list(step.one_hot.columns)
    if isinstance(step, OrdinalStep):
        return list(step.ordinal)
    if isinstance(step, HashingStep):
        return list(step.hashing.columns)
    return list(step.bucketize.columns)
