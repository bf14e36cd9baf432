"""A stored feature-set version's manifest: what it holds and where it came from, typed.

The manifest is written last into a version's folder (it publishes the version) and read by
every layer above the store: the trainer (transforms, classes, target statistics), the registry
(the raw schema and sample for the model's signature and input example) and the CLI. One frozen,
validated model instead of a dict read by key: a missing or misspelt field fails where the
manifest is read, not deep inside a trial.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SAMPLE_ROWS = 5
"""Raw rows a manifest keeps: the registered model's input example."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class SourceRecord(_Record):
    uri: str
    """The source as the spec names it (relative to the spec's folder)."""
    fingerprint: str
    """Changes whenever the source's content may have: a version built from it is reused only
    while it stays the same."""


class SplitRecord(_Record):
    """How the rows were split (the spec's ``data.split``), and whether by class."""

    valid: float
    test: float
    seed: int
    stratified: bool
    time: str | None = None
    group: str | None = None


class ColumnStatistics(_Record):
    """A feature column of the training split, before transforms."""

    mean: float
    std: float
    min: float
    max: float


class TargetStatistics(_Record):
    """A regression target on the training split: what the trainer standardizes it with."""

    mean: float
    std: float


class Manifest(_Record):
    """One stored version of a feature set."""

    name: str
    version: str
    """The content hash of the rows and of every field that changes what a model sees."""
    created_at: str
    """When the version was planned (ISO 8601, UTC)."""
    source: SourceRecord
    raw_schema: dict[str, str] = Field(alias="schema")
    """Each column of the source as read, with its Arrow type (``int64``, ``double``, ``string``)."""
    target: str
    entity: str | None = None
    """The column of entity ids kept with the stored rows (``data.entity``)."""
    task: Literal["classification", "regression"]
    task_decision: str = ""
    """Why the task is what it is, in words a user can act on."""
    classes: list[Any] | None = None
    """A classification's labels, in the order of the encoded target."""
    feature_columns: list[str]
    split: SplitRecord
    statistics: dict[str, ColumnStatistics]
    transforms: list[dict[str, Any]]
    """The fitted transforms, as ``raylens.features.transforms.transforms_from_dicts`` reads them."""
    encoders: list[dict[str, Any]] | None = None
    """The fitted encodings of source columns, as ``raylens.features.encoders.encoders_from_dicts``
    reads them (None: no column is encoded)."""
    input_columns: list[str] | None = None
    """The source columns the features come from, where encodings made the feature columns other
    than them (None: the feature columns themselves)."""
    rows: dict[str, int] = Field(default_factory=dict)
    """Rows of each split."""
    target_statistics: TargetStatistics | None = None
    quarantined: dict[str, int] = Field(default_factory=dict)
    """Source rows set aside by data validation, per reason (``column: rule``); they are kept in
    the version's quarantine.parquet."""
    build_key: str = ""
    """A hash of the source's fingerprint and the data and features sections that built this
    version: a build with the same key reuses it without reading the rows."""
    sample: list[dict[str, Any]] = Field(default_factory=list)
    """The first few raw rows of the training split (the model's input columns, as the source has
    them)."""

    @property
    def model_inputs(self) -> list[str]:
        """The columns a model built on this version takes: the source's, before any encoding."""
        return list(self.input_columns if self.input_columns is not None else self.feature_columns)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.model_validate_json(text)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """As stored (``schema`` by that name), JSON types only."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def hashed(self) -> dict[str, Any]:
        """The fields that change what a model sees: what the version's hash covers besides
        the rows (not the name, the time, the version itself, the row counts, the sample)."""
        excluded = {"name", "created_at", "version", "rows", "sample", "build_key"}
        return {k: v for k, v in self.to_dict().items() if k not in excluded}

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.classes is not None else 1
