"""Fully sharded data parallel (FSDP2 ``fully_shard``): parameters, gradients and optimizer
state are sharded across ranks.

Each child module with parameters becomes its own shard group, then the root, so only one
layer's full parameters exist at a time during forward and backward. The forward is itself
collective: every rank scores every validation row, in step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raylens.trainer.parallel.plan import Parallelized


def apply(model: nn.Module, device: torch.device) -> Parallelized:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in list(model.modules())[1:]:
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return Parallelized(model, model, shards_validation=False, sharded_checkpoint=True)
