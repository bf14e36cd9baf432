"""The collectives the loop uses beside the strategies' own."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def collective_device() -> torch.device:
    """Where a collective's tensors must be: NCCL (``use_gpu``) reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum a float64 vector over every rank of the process group."""
    tensor = torch.tensor(np.ascontiguousarray(values, dtype=np.float64), device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()
