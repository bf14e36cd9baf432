"""One worker: the model as it is."""

from __future__ import annotations

import torch
from torch import nn

from raylens.trainer.parallel.plan import Parallelized


def apply(model: nn.Module, device: torch.device) -> Parallelized:
    model = model.to(device)
    return Parallelized(model, model, shards_validation=False)
