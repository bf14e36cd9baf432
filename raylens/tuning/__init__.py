"""Search spaces, schedulers, sweeps on Ray Tune, and sweep tracking as one tree of runs."""

from raylens.tuning.config import TuneConfig
from raylens.tuning.plan import ConcurrencyPlan, plan_concurrency
from raylens.tuning.space import Distribution, check_space, parse_space, sample_configs, with_overrides

__all__ = [
    "ConcurrencyPlan",
    "Distribution",
    "TuneConfig",
    "check_space",
    "parse_space",
    "plan_concurrency",
    "sample_configs",
    "with_overrides",
]
