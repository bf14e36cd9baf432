"""Data prepare and feature pipelines, and the versioned offline store.

Terms: a *feature set* is the output of the pipeline for one spec; a *version* is one stored
result, named by the content hash of its rows and fitted transforms.
"""

from raylens.features.config import DataConfig, FeaturesConfig, SplitConfig, StandardizeStep
from raylens.features.pipeline import (
    PlannedFeatureSet,
    build_feature_set,
    plan_feature_set,
    publish_feature_set,
)
from raylens.features.store import FeatureSet, SplitArrays, list_feature_sets, open_feature_set
from raylens.features.transforms import FittedStandardize, apply_all, invert_all, transforms_from_dicts

__all__ = [
    "DataConfig",
    "FeatureSet",
    "FeaturesConfig",
    "FittedStandardize",
    "PlannedFeatureSet",
    "SplitArrays",
    "SplitConfig",
    "StandardizeStep",
    "apply_all",
    "build_feature_set",
    "invert_all",
    "list_feature_sets",
    "open_feature_set",
    "plan_feature_set",
    "publish_feature_set",
    "transforms_from_dicts",
]
