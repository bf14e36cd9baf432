"""Data prepare and feature pipelines, and the versioned offline store.

Terms: a *feature set* is the output of the pipeline for one spec; a *version* is one stored
result, named by the content hash of its rows and fitted transforms. Exports are imported on first
use (``raylens.lazy``): reading the data config imports neither NumPy nor pyarrow.
"""

from typing import TYPE_CHECKING

from raylens.lazy import lazy_exports

if TYPE_CHECKING:
    from raylens.features.config import DataConfig, FeaturesConfig, SplitConfig, StandardizeStep
    from raylens.features.pipeline import (
        PlannedFeatureSet,
        RowsDone,
        build_feature_set,
        plan_feature_set,
        publish_feature_set,
    )
    from raylens.features.store import FeatureSet, SplitArrays, list_feature_sets, open_feature_set
    from raylens.features.transforms import FittedTransform, apply_all, invert_all, transforms_from_dicts

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "raylens.features.config": ["DataConfig", "FeaturesConfig", "SplitConfig", "StandardizeStep"],
        "raylens.features.pipeline": [
            "PlannedFeatureSet",
            "RowsDone",
            "build_feature_set",
            "plan_feature_set",
            "publish_feature_set",
        ],
        "raylens.features.store": ["FeatureSet", "SplitArrays", "list_feature_sets", "open_feature_set"],
        "raylens.features.transforms": [
            "FittedTransform",
            "apply_all",
            "invert_all",
            "transforms_from_dicts",
        ],
    },
)
