"""The feature pipeline: source → prepare → split → fit transforms → versioned feature set."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from raylens.features.config import DataConfig, FeaturesConfig
from raylens.features.prepare import prepare
from raylens.features.sources import load_source
from raylens.features.splits import split_rows
from raylens.features.store import FeatureSet, SplitArrays, write_feature_set
from raylens.features.transforms import apply_all, fit_standardize


def build_feature_set(
    name: str,
    data: DataConfig,
    features: FeaturesConfig,
    store_root: Path,
    base_dir: Path | None = None,
) -> FeatureSet:
    """Run the data prepare and feature pipelines and publish the result in the offline store.

    Every check runs before the first byte is written, so bad input leaves the store untouched.
    """
    raw = load_source(data.source, base_dir)
    prepared = prepare(raw.table, data)
    stratify = prepared.task == "classification"
    split = split_rows(prepared.y, data.split, stratify=stratify)
    x_train = prepared.x[split.train]
    fitted = [fit_standardize(step, x_train, prepared.feature_columns) for step in features.transforms]

    def arrays(index: np.ndarray) -> SplitArrays:
        return SplitArrays(apply_all(fitted, prepared.x[index], prepared.feature_columns), prepared.y[index])

    manifest: dict[str, Any] = {
        "name": name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {"uri": raw.uri, "fingerprint": raw.fingerprint},
        "schema": {field.name: str(field.type) for field in raw.table.schema},
        "target": data.target,
        "task": prepared.task,
        "classes": prepared.classes,
        "feature_columns": prepared.feature_columns,
        "split": {**data.split.model_dump(), "stratified": stratify},
        "statistics": _column_statistics(x_train, prepared.feature_columns),
        "transforms": [t.to_dict() for t in fitted],
    }
    if prepared.task == "regression":
        y_train = prepared.y[split.train].astype(np.float64)
        manifest["target_statistics"] = {"mean": float(y_train.mean()), "std": float(y_train.std() or 1.0)}
    return write_feature_set(
        store_root,
        manifest,
        prepared.feature_columns,
        {"train": arrays(split.train), "valid": arrays(split.valid), "test": arrays(split.test)},
    )


def _column_statistics(x: np.ndarray, columns: list[str]) -> dict[str, dict[str, float]]:
    """Raw (pre-transform) statistics of the training split, per feature column."""
    x64 = x.astype(np.float64)
    return {
        name: {
            "mean": float(x64[:, i].mean()),
            "std": float(x64[:, i].std()),
            "min": float(x64[:, i].min()),
            "max": float(x64[:, i].max()),
        }
        for i, name in enumerate(columns)
    }
