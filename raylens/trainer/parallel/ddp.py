"""Data parallel: every rank holds a replica; gradients are averaged after each backward."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from raylens.trainer.parallel.plan import Parallelized


def apply(model: nn.Module, device: torch.device) -> Parallelized:
    model.to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    # Replicas are identical: each rank scores its share of the validation rows with the bare
    # module (its forward holds no collective) and the metric sums are all-reduced.
    return Parallelized(wrapped, cast(nn.Module, wrapped.module), shards_validation=True)
