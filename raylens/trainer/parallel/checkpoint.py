"""Checkpoints of a (possibly parallelized) model, with every rank's random state so a resumed
run draws what the uninterrupted one would have. Two layouts:

- whole (one worker, DDP): rank 0 saves the full model and optimizer state as one file
  (``checkpoint.pt``); a DDP replica is whole on every rank, so nothing is gathered;
- sharded (FSDP, pipeline): every rank saves its own shard with ``torch.distributed.checkpoint``
  (``.metadata`` and ``__<rank>_0.distcp`` files, the parameters under the model's own names,
  optimizer state flattened per parameter), its random state (``rng_<rank>.pt``) and rank 0 the
  epoch (``sharded.json``); nothing is gathered on one rank. Ray Train merges every rank's files
  into the same checkpoint folder. Restoring loads each rank's shard in place; the driver reads
  the whole model from the shards (``load_model_weights``), with no process group.
"""

from __future__ import annotations

import json
import random
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raylens.trainer.loop import EpochSoFar, TrainState

CHECKPOINT_FILE = "checkpoint.pt"
SHARDED_FILE = "sharded.json"
"""Marks a sharded checkpoint and holds its epoch (written by rank 0 beside the shards)."""


def _holds_shards(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP): then only torch.distributed.checkpoint's
    state-dict functions can gather or place it. (Nothing can be a DTensor before that module
    is imported; importing it takes a second, which a DDP or one-process run never pays.)"""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters())


StateDicts = tuple[dict[str, Any], dict[str, Any]]
"""A model's and its optimizer's state dicts."""


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> StateDicts:
    """Each rank's own tensors; the optimizer's state keyed per parameter name, so pipeline stages
    (which hold different parameters) never write the same key."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))


def _set_sharded_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optim_state: dict[str, Any],
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(flatten_optimizer_state_dict=True),
    )


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _whole_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> StateDicts:
    """The model's and optimizer's state as torch.distributed.checkpoint's full state dict has
    it (the model's own parameter names, no DDP prefix; optimizer state keyed by those names),
    on the CPU."""
    if _holds_shards(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=full)
    module = _unwrapped(model)
    model_state = {k: _on_cpu(v) for k, v in module.state_dict().items()}
    names = _parameter_names(module, optimizer)
    plain = optimizer.state_dict()
    optim_state = {
        "state": {names[i]: _on_cpu(v) for i, v in plain["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in plain["param_groups"]],
    }
    return model_state, optim_state


def _parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's own order (the indices of its state dict)."""
    by_id = {id(p): name for name, p in module.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _on_cpu(value: Any) -> Any:
    # A copy: the live tensors change with the next step, the checkpoint must not.
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


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


def _position(step: int | None, so_far: EpochSoFar | None) -> dict[str, Any]:
    """Where in its epoch a mid-epoch checkpoint was taken (nothing for an epoch's end)."""
    if step is None:
        return {}
    return {"step": step, "so_far": so_far.as_list() if so_far is not None else None}


def resume_position(state: dict[str, Any]) -> tuple[int | None, EpochSoFar | None]:
    """A checkpoint's optimizer steps and unfinished epoch's sums, if taken mid-epoch."""
    so_far = state.get("so_far")
    return state.get("step"), EpochSoFar.from_list(so_far) if so_far is not None else None


def gather_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    *,
    step: int | None = None,
    so_far: EpochSoFar | None = None,
) -> dict[str, Any]:
    """Full (unsharded, unwrapped) model and optimizer state, and every rank's random state. A
    collective under DDP/FSDP: every rank calls it; rank 0 gets the whole state."""
    model_state, optim_state = _whole_state(model, optimizer)
    rng = [rng_state()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    return {
        "model": model_state,
        "optimizer": optim_state,
        "epoch": epoch,
        "rng": rng,
        **_position(step, so_far),
    }


def write_checkpoint(state: TrainState, folder: Path, *, rank: int = 0) -> bool:
    """Save ``state`` into ``folder`` (each rank may pass its own folder: the files' names
    differ by rank). A collective: every rank calls it. Returns whether this rank wrote any file
    (a whole checkpoint is rank 0's)."""
    model, optimizer, epoch = state.model, state.optimizer, state.epoch
    if not state.sharded:
        whole = gather_checkpoint(model, optimizer, epoch, step=state.step, so_far=state.so_far)
        if rank == 0:
            save_checkpoint(whole, folder)
            write_attachments(state.attachments, folder)
        return rank == 0
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = _sharded_state(model, optimizer)
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))
    torch.save(rng_state(), folder / f"rng_{rank}.pt")
    if rank == 0:
        write_attachments(state.attachments, folder)
        (folder / SHARDED_FILE).write_text(
            json.dumps({"epoch": epoch, **_position(state.step, state.so_far)})
        )
    return True


def write_attachments(attachments: Mapping[str, bytes], folder: Path) -> None:
    """Files a checkpoint keeps beside the state (``TrainState.attachments``)."""
    for name, content in attachments.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def save_checkpoint(state: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    torch.save(state, path)
    return path


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read back (truncated upload, disk error, edited by hand)."""


def load_checkpoint(folder: Path) -> dict[str, Any]:
    """A whole checkpoint's state; for a sharded one, its epoch, random states and folder
    (``sharded``), its files checked to be all there (the shards are read by ``restore``)."""
    if (folder / SHARDED_FILE).exists():
        return _sharded_checkpoint(folder)
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
    return {**state, ATTACHMENTS: read_attachments(folder)}


ATTACHMENTS = "attachments"
"""The key of a loaded checkpoint's attachments (``TrainState.attachments``)."""


def read_attachments(folder: Path) -> dict[str, bytes]:
    """The files a checkpoint keeps beside the state: those in its sub-folders."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for sub in sorted(folder.iterdir())
        if sub.is_dir()
        for path in sorted(sub.rglob("*"))
        if path.is_file()
    }


def _sharded_checkpoint(folder: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        marker = json.loads((folder / SHARDED_FILE).read_text())
        epoch = int(marker["epoch"])
        metadata = FileSystemReader(str(folder)).read_metadata()
        rng_files = sorted(folder.glob("rng_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        rng = [torch.load(p, weights_only=True) for p in rng_files]
    except Exception as exc:  # missing .metadata, edited JSON, truncated files, ...
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CorruptCheckpoint(f"{folder} cannot be read ({type(exc).__name__}: {reason})") from None
    # Every byte range the metadata points at must be there: a shard cut short (a rank that died
    # while writing) is found here, not halfway through a restore.
    storage = getattr(metadata, "storage_data", None) or {}
    for item in storage.values():
        path = folder / item.relative_path
        if not path.exists() or path.stat().st_size < item.offset + item.length:
            raise CorruptCheckpoint(f"{folder} is incomplete: {item.relative_path} is missing or cut short")
    position = {k: marker[k] for k in ("step", "so_far") if k in marker}
    return {
        "sharded": str(folder),
        "epoch": epoch,
        "rng": rng,
        **position,
        ATTACHMENTS: read_attachments(folder),
    }


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """The whole model's weights from a checkpoint of either layout, into ``model`` (not
    parallelized; no process group needed)."""
    state = load_checkpoint(folder)
    if "sharded" not in state:
        model.load_state_dict(state["model"])
        return
    import torch.distributed.checkpoint as dcp

    weights = {"model": model.state_dict()}
    with warnings.catch_warnings():
        # Its notice that no process group is set up: reading here, in one process, is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(weights, checkpoint_id=state["sharded"], no_dist=True)
    model.load_state_dict(weights["model"])


def restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Load a checkpoint into a (possibly parallelized) model — a whole one, or each rank's shard
    of a sharded one (a collective then) — and this rank's random state when the checkpoint was
    written by as many ranks; return the epochs it completed."""
    if "sharded" in state:
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = _sharded_state(model, optimizer)
        shards = {"model": model_state, "optimizer": optim_state}
        dcp.load(shards, checkpoint_id=state["sharded"])
        _set_sharded_state(model, optimizer, model_state, optim_state)
    else:
        _restore_whole(model, optimizer, state)
    rng = state.get("rng")
    if rng and len(rng) == world_size:
        set_rng_state(rng[rank])
    return int(state["epoch"])


def _restore_whole(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if _holds_shards(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
        return
    module = _unwrapped(model)
    module.load_state_dict(state["model"])
    index = {name: i for i, name in enumerate(_parameter_names(module, optimizer))}
    saved = state["optimizer"]
    optimizer.load_state_dict(
        {
            "state": {index[name]: v for name, v in saved["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]],
        }
    )
