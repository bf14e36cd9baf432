"""Parallel strategies applied to a model from outside, one module per strategy (``single``,
``ddp``, ``fsdp``, ``pipeline``), chosen by a ``ParallelPlan``; checkpoints that any of them can restore."""

from raylens.trainer.parallel.checkpoint import (
    CHECKPOINT_FILE,
    CorruptCheckpoint,
    gather_checkpoint,
    load_checkpoint,
    load_model_weights,
    restore,
    resume_position,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_checkpoint,
)
from raylens.trainer.parallel.collectives import all_reduce_sum
from raylens.trainer.parallel.plan import Parallelized, ParallelPlan, Strategy

__all__ = [
    "CHECKPOINT_FILE",
    "CorruptCheckpoint",
    "ParallelPlan",
    "Parallelized",
    "Strategy",
    "all_reduce_sum",
    "gather_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "restore",
    "resume_position",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_checkpoint",
]
