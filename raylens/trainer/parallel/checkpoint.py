"""Checkpoints of a (possibly parallelized) model: the full state gathered from every rank,
saved as one file, loaded back and restored into any strategy's module, with every rank's
random state so a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

CHECKPOINT_FILE = "checkpoint.pt"

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict[str, Any]:
    """This process's random generators (torch, numpy, python), as plain tensors and tuples so a
    ``weights_only`` load accepts them. Dropout and any randomness in a user's model draw from
    these: a run resumed without them diverges from the uninterrupted one."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value: Any) -> Any:
    # random.setstate wants tuples all the way down; a round trip may hand back lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def gather_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
    """Full (unsharded, unwrapped) model and optimizer state, and every rank's random state. A
    collective under DDP/FSDP: every rank calls it; rank 0 gets the whole state."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_FULL)
    rng = [rng_state()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    return {"model": model_state, "optimizer": optim_state, "epoch": epoch, "rng": rng}


def save_checkpoint(state: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    torch.save(state, path)
    return path


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read back (truncated upload, disk error, edited by hand)."""


def load_checkpoint(folder: Path) -> dict[str, Any]:
    path = folder / CHECKPOINT_FILE
    try:
        # weights_only: a checkpoint is data, never code to run.
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path} is missing") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on bad bytes
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CorruptCheckpoint(f"{path} cannot be read ({type(exc).__name__}: {reason})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch"} <= state.keys():
        raise CorruptCheckpoint(f"{path} is not a raylens checkpoint")
    return state


def restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Load a full checkpoint into a (possibly parallelized) model, and this rank's random state
    when the checkpoint was written by as many ranks; return the epochs it completed."""
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    rng = state.get("rng")
    if rng and len(rng) == world_size:
        set_rng_state(rng[rank])
    return int(state["epoch"])
