"""Search spaces, schedulers, sweeps on Ray Tune, and sweep tracking as one tree of runs.

Exports are imported on first use (``raylens.lazy``): reading the tune config imports no Ray.
"""

from typing import TYPE_CHECKING

from raylens.lazy import lazy_exports

if TYPE_CHECKING:
    from raylens.tuning.candidates import Candidate, candidates_of, sampled_configs
    from raylens.tuning.config import TuneConfig
    from raylens.tuning.plan import ConcurrencyPlan, plan_concurrency
    from raylens.tuning.space import Distribution, check_space, parse_space, sample_configs, with_overrides

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "raylens.tuning.candidates": ["Candidate", "candidates_of", "sampled_configs"],
        "raylens.tuning.config": ["TuneConfig"],
        "raylens.tuning.plan": ["ConcurrencyPlan", "plan_concurrency"],
        "raylens.tuning.space": [
            "Distribution",
            "check_space",
            "parse_space",
            "sample_configs",
            "with_overrides",
        ],
    },
)
