"""The torch family: PyTorch modules trained by the plain loop, distributed by Ray Train.

Loading a registered torch model imports this module: Ray is imported only inside ``train``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from raylens.trainer.config import AnyModelConfig, TorchModelConfig
from raylens.trainer.family import ModelFiles, StoppedByRule, Trained, TrialReport, user_code
from raylens.trainer.loop import TrainState, predict, predict_proba
from raylens.trainer.models import build_model, check_model_runs, check_params
from raylens.trainer.task import TaskSpec

if TYPE_CHECKING:
    from raylens.features import FeatureSet, SplitArrays
    from raylens.storage import Location
    from raylens.trainer.family import TrainJob
    from raylens.trainer.parallel import ParallelPlan

WEIGHTS = "weights"


class TorchPredictor:
    """A module in eval mode, fed in chunks: predictions decoded as the task says."""

    def __init__(self, model: nn.Module, task: TaskSpec) -> None:
        self.model, self.task = model.eval(), task

    def predict(self, x: np.ndarray) -> np.ndarray:
        return predict(self.model, torch.from_numpy(x), self.task)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return predict_proba(self.model, torch.from_numpy(x), self.task)


def _torch_config(config: AnyModelConfig) -> TorchModelConfig:
    assert isinstance(config, TorchModelConfig), f"the torch family got a {config.family} model"
    return config


def node_layout(job: TrainJob, *, embedded: bool) -> tuple[TrainJob, ParallelPlan]:
    """The job as it will train, and its plan. On the embedded cluster (one machine) ``auto``
    with several CPU workers trains in one process with all their CPUs, while a replica fits
    (``one_process_reason``); elsewhere the job is as given."""
    from raylens.trainer.parallel import ParallelPlan
    from raylens.trainer.parallel.plan import one_process_reason, worker_memory

    scaling = job.train.scaling
    if embedded and scaling.strategy == "auto" and not scaling.use_gpu and isinstance(scaling.workers, int):
        model = build_model(_torch_config(job.model), job.in_features, job.task.out_features)
        cpus = scaling.workers * scaling.cpus_per_worker
        reason = one_process_reason(
            scaling.workers,
            cpus,
            sum(p.numel() for p in model.parameters()),
            worker_memory(torch.device("cpu"), 1),
        )
        if reason is not None:
            one = scaling.model_copy(update={"workers": 1, "cpus_per_worker": cpus})
            job = replace(job, train=job.train.model_copy(update={"scaling": one}))
            return job, ParallelPlan("none", 1, "cpu", reason)
    return job, parallel_plan(job)


def parallel_plan(job: TrainJob) -> ParallelPlan:
    """The strategy the run's workers will apply, and why (recorded as the run's tag), judged
    here with this machine's memory (each rank judges with its own, the smallest winning)."""
    from raylens.trainer.parallel import ParallelPlan
    from raylens.trainer.parallel.plan import worker_memory

    scaling = job.train.scaling
    device = torch.device("cuda" if scaling.use_gpu else "cpu")
    model = build_model(_torch_config(job.model), job.in_features, job.task.out_features)
    return ParallelPlan.from_config(
        scaling.strategy,
        scaling.max_workers,
        device.type,
        parameters=sum(p.numel() for p in model.parameters()),
        worker_memory=worker_memory(device, scaling.max_workers) if device.type == "cpu" else None,
        pipeline=scaling.pipeline,
    )


class _FolderReporter:
    """Saves each reported state as a whole checkpoint folder, handed to the sweep's report."""

    def __init__(self, report: TrialReport) -> None:
        self._report = report

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        from raylens.trainer.parallel import gather_checkpoint, save_checkpoint
        from raylens.trainer.parallel.checkpoint import write_attachments

        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(
                gather_checkpoint(
                    state.model, state.optimizer, state.epoch, step=state.step, so_far=state.so_far
                ),
                Path(tmp),
            )
            write_attachments(state.attachments, Path(tmp))
            self._report(metrics, Path(tmp))


class TorchFamily:
    name = "torch"

    def check_params(self, config: AnyModelConfig) -> None:
        check_params(_torch_config(config))

    def check_on_rows(self, config: AnyModelConfig, rows: np.ndarray, task: str, num_outputs: int) -> None:
        check_model_runs(_torch_config(config), torch.from_numpy(rows), num_outputs)

    def layout(self, job: TrainJob, *, embedded: bool) -> tuple[TrainJob, str]:
        laid_out, plan = node_layout(job, embedded=embedded)
        return laid_out, plan.reason

    def train(
        self,
        job: TrainJob,
        feature_set: FeatureSet,
        *,
        run_name: str,
        storage_path: Location,
        on_epoch: Callable[[dict[str, float]], None],
        on_notice: Callable[[str], None],
        embedded: bool,
    ) -> Trained:
        from raylens.trainer.parallel import load_model_weights
        from raylens.trainer.ray_train import train_distributed

        outcome = train_distributed(
            job,
            feature_set,
            run_name=run_name,
            storage_path=storage_path,
            on_epoch=on_epoch,
            on_notice=on_notice,
            embedded=embedded,
        )
        model = build_model(_torch_config(job.model), job.in_features, job.task.out_features)
        chosen, tags = outcome.checkpoint_dir, {}
        if outcome.best is not None:
            chosen, reported = outcome.best
            tags = {"raylens.model_epoch": f"{reported['epoch']:g}", "raylens.model_checkpoint": chosen.name}
        load_model_weights(model, chosen)
        if outcome.stopped_by is not None:
            tags["raylens.stopped_by"] = outcome.stopped_by[:4000]
        return Trained(TorchPredictor(model, job.task), outcome.history, outcome.checkpoint_dir, tags)

    def run_trial(
        self,
        job: TrainJob,
        train: SplitArrays,
        valid: SplitArrays,
        report: TrialReport,
        resume_from: Path | None,
    ) -> None:
        from raylens.trainer.job import raise_if_failed, run_worker
        from raylens.trainer.parallel import load_checkpoint

        # The trial's process trains with the CPUs Tune reserved for it (tune.cpus_per_trial).
        torch.set_num_threads(max(1, round(job.train.scaling.cpus_per_worker)))
        state = load_checkpoint(resume_from) if resume_from is not None else None
        ended = raise_if_failed(run_worker(job, train, valid, _FolderReporter(report), resume_from=state))
        if ended.stopped is not None and ended.stopped.rule is not None:
            raise StoppedByRule(ended.stopped.reason)

    def trial_predictor(self, job: TrainJob, checkpoint: Path) -> TorchPredictor:
        from raylens.trainer.parallel import load_model_weights

        model = build_model(_torch_config(job.model), job.in_features, job.task.out_features)
        load_model_weights(model, checkpoint)
        return TorchPredictor(model, job.task)

    def model_files(self, trained: Trained, config: AnyModelConfig, folder: Path) -> ModelFiles:
        predictor = trained.predictor
        assert isinstance(predictor, TorchPredictor)
        state = predictor.model.state_dict()
        torch.save(state, folder / "weights.pt")
        content = b"".join(
            name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes()
            for name, tensor in sorted(state.items())
        )
        name = _torch_config(config).name
        return ModelFiles(
            {WEIGHTS: str(folder / "weights.pt")}, content, user_code(name) if ":" in name else []
        )

    def load_predictor(
        self, artifacts: Mapping[str, str], config: AnyModelConfig, task: TaskSpec, in_features: int
    ) -> TorchPredictor:
        model = build_model(_torch_config(config), in_features, task.out_features)
        model.load_state_dict(torch.load(artifacts[WEIGHTS], map_location="cpu", weights_only=True))
        return TorchPredictor(model, task)


FAMILY = TorchFamily()
