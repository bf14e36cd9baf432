"""The benchmarks' data: synthetic classification, 64 standardized features, 10 classes."""

from __future__ import annotations

from pathlib import Path

from raylens.features import DataConfig, FeaturesConfig, FeatureSet, build_feature_set


def synthetic_feature_set(rows: int, folder: Path) -> FeatureSet:
    return build_feature_set(
        "bench",
        DataConfig(
            source=f"synthetic:classification?rows={rows}&features=64&classes=10&seed=0", target="target"
        ),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        folder,
    )
