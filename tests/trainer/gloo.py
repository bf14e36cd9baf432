"""A 2-process gloo harness for the distributed loop, without Ray: ``run_ranks`` spawns the ranks
with torch.multiprocessing, sets up the process group on 127.0.0.1 (what Ray Train does for its
workers) and runs a scenario — several ``run_worker`` calls in the same group — in each rank.

One launch costs a few seconds (two fresh interpreters importing torch), against 10 to 20 s for a
Ray Train run, so the numerics of DDP and FSDP (equivalence, resume, dropout) are tested here and
the Ray Train tests keep to the bridge itself.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from raylens.features import SplitArrays
from raylens.trainer import TrainJob, TrainState, run_worker
from raylens.trainer.loop import FitResult, Heartbeat, Monitor
from raylens.trainer.models import build_model
from raylens.trainer.parallel import load_checkpoint, load_model_weights, write_checkpoint

Scenario = Callable[["Ranks"], dict[str, Any]]


class Collect:
    """A reporter that keeps every epoch's metrics and writes each epoch's checkpoint as a Ray
    Train worker does (``write_checkpoint``: whole on rank 0, or every rank's shard), into
    ``folder`` (the same on every rank); ``states`` holds each one as ``load_checkpoint`` reads it."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or Path(tempfile.mkdtemp(prefix="collect-"))
        self.metrics: list[dict[str, float]] = []
        self.states: list[dict[str, Any]] = []
        self.folders: list[Path] = []
        self.replica: dict[str, torch.Tensor] = {}
        """Under DDP, this rank's own copy of the weights after the last epoch."""
        self.result: FitResult | None = None
        """How the run ended."""

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        self.metrics.append({k: v for k, v in metrics.items() if not k.endswith("_per_s")})  # timing varies
        folder = self.folder / f"report{len(self.states) + 1}"
        rank = dist.get_rank() if dist.is_initialized() else 0
        write_checkpoint(state, folder, rank=rank)
        if dist.is_initialized():
            dist.barrier()  # rank 0 writes a whole checkpoint alone
        self.states.append(load_checkpoint(folder))
        self.folders.append(folder)
        if isinstance(state.model, DistributedDataParallel):
            self.replica = {k: v.detach().clone() for k, v in state.model.module.state_dict().items()}

    def whole_model(self, job: TrainJob, epoch: int = -1) -> dict[str, torch.Tensor]:
        """The whole model's weights in an epoch's checkpoint (of any layout), read back as the
        driver reads the final one."""
        model = build_model(job.model, job.in_features, job.task.out_features)
        load_model_weights(model, self.folders[epoch])
        return model.state_dict()


class Ranks:
    """What a scenario gets in each rank: its rank, and ``train`` to run one job in the group."""

    def __init__(self, rank: int, world_size: int, train: SplitArrays, valid: SplitArrays, out: Path) -> None:
        self.rank, self.world_size = rank, world_size
        self.train_split, self.valid_split = train, valid
        self.out = out
        self.runs = 0

    def train(
        self,
        job: TrainJob,
        resume_from: dict[str, Any] | None = None,
        monitors: Sequence[Monitor] = (),
        heartbeat: Heartbeat | None = None,
    ) -> Collect:
        self.runs += 1  # every rank trains the same runs in the same order: the folders agree
        reporter = Collect(self.out / f"run{self.runs}")
        reporter.result = run_worker(
            job,
            self.train_split,
            self.valid_split,
            reporter,
            rank=self.rank,
            world_size=self.world_size,
            resume_from=resume_from,
            monitors=monitors,
            heartbeat=heartbeat,
        )
        return reporter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    scenario: Scenario,
    train: SplitArrays,
    valid: SplitArrays,
    out: str,
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = scenario(Ranks(rank, world_size, train, valid, Path(out)))
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(
    scenario: Scenario, train: SplitArrays, valid: SplitArrays, out: Path, world_size: int = 2
) -> list[dict[str, Any]]:
    """Run ``scenario`` (a module-level function: it is pickled) in ``world_size`` gloo ranks
    and return what each rank's call returned."""
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _rank_main,
        args=(world_size, _free_port(), scenario, train, valid, str(out)),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
