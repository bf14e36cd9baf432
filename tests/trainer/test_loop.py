import subprocess
import sys

import pytest
import torch

from raylens.features import FeatureSet
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob, TrainState, run_worker
from raylens.trainer.decisions import GO_ON, Action, Decision
from raylens.trainer.loop import StepView
from raylens.trainer.parallel import gather_checkpoint


class Collect:
    """A reporter that keeps what it is given, as a test double of the real (Ray) reporter."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.states: list[dict] = []

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        self.metrics.append(metrics)
        self.states.append(
            gather_checkpoint(state.model, state.optimizer, state.epoch, step=state.step, so_far=state.so_far)
        )


def job(fs: FeatureSet, epochs: int, dropout: float = 0.0) -> TrainJob:
    return TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16], "dropout": dropout}),
        TrainConfig(epochs=epochs, batch_size=16, optimizer={"lr": 0.01}),
        fs,
    )


def test_loop_learns_and_reports_every_epoch(iris: FeatureSet) -> None:
    reporter = Collect()
    run_worker(job(iris, 15), iris.read("train"), iris.read("valid"), reporter)
    assert [m["epoch"] for m in reporter.metrics] == list(range(1, 16))
    assert reporter.metrics[-1]["train_loss"] < reporter.metrics[0]["train_loss"] / 2
    assert reporter.metrics[-1]["valid_accuracy"] > 0.85
    assert {"valid_loss", "valid_f1_macro", "train_samples_per_s"} <= set(reporter.metrics[-1])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_resumed_run_equals_uninterrupted_run(iris: FeatureSet, dropout: float) -> None:
    """With dropout the model draws from the global generators every step: the checkpoint must
    carry their state, or the resumed run diverges."""
    straight = Collect()
    run_worker(job(iris, 4, dropout), iris.read("train"), iris.read("valid"), straight)
    first_half = Collect()
    run_worker(job(iris, 2, dropout), iris.read("train"), iris.read("valid"), first_half)
    torch.manual_seed(12345)  # whatever the process drew in between must not matter
    resumed = Collect()
    run_worker(
        job(iris, 4, dropout),
        iris.read("train"),
        iris.read("valid"),
        resumed,
        resume_from=first_half.states[-1],
    )

    assert [m["epoch"] for m in resumed.metrics] == [3.0, 4.0]
    for name, tensor in straight.states[-1]["model"].items():
        assert torch.equal(tensor, resumed.states[-1]["model"][name]), name
    assert resumed.metrics[-1]["valid_loss"] == straight.metrics[-1]["valid_loss"]


def test_same_seed_same_model(iris: FeatureSet) -> None:
    a, b = Collect(), Collect()
    run_worker(job(iris, 2), iris.read("train"), iris.read("valid"), a)
    run_worker(job(iris, 2), iris.read("train"), iris.read("valid"), b)
    assert a.metrics[-1]["valid_loss"] == b.metrics[-1]["valid_loss"]


@pytest.mark.parametrize(
    ("name", "kind"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_each_optimizer_of_the_spec_is_torchs_own(name: str, kind: type) -> None:
    from raylens.trainer.config import OptimizerConfig
    from raylens.trainer.loop import make_optimizer

    optimizer = make_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(name=name, lr=0.125))
    assert type(optimizer) is kind and optimizer.param_groups[0]["lr"] == 0.125


def test_the_loop_never_imports_ray() -> None:
    code = (
        "import sys; import raylens.trainer, raylens.trainer.loop, raylens.trainer.artifacts; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_what_starts_before_the_first_step_imports_only_what_it_needs() -> None:
    """Ray Train's controller unpickles the run's callback: it imports Ray, not torch or the
    trainer. A worker of a DDP or one-process run never imports torch.distributed.checkpoint
    (a second of start-up per process); only sharded (FSDP, pipeline) runs use it."""
    code = (
        "import sys; import raylens.trainer.ray_controller; "
        "assert 'torch' not in sys.modules and 'raylens.trainer.job' not in sys.modules; "
        "import raylens.trainer.ray_train; "
        "assert 'torch.distributed.checkpoint' not in sys.modules, 'imported at start'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_whole_checkpoint_has_torch_distributed_checkpoints_layout_and_restores_exactly() -> None:
    """One-process and DDP checkpoints are written without torch.distributed.checkpoint, in its
    full state dict's layout (checkpoints written with it still restore), and resume exactly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from raylens.trainer.parallel.checkpoint import _restore_whole, _whole_state

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
        )
        model[0].bias.requires_grad_(False)  # a frozen parameter: in no group, no state
        groups = [
            {"params": [model[0].weight, model[1].weight, model[1].bias]},
            {"params": [model[3].weight, model[3].bias], "lr": 0.1},
        ]
        return model, torch.optim.AdamW(groups)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    model, optimizer = build(0)
    for _ in range(3):
        step(model, optimizer, torch.randn(5, 4))
    ours = _whole_state(model, optimizer)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    theirs = get_state_dict(model, optimizer, options=full)
    assert ours[0].keys() == theirs[0].keys()
    assert all(torch.equal(ours[0][k], theirs[0][k]) for k in ours[0])
    assert ours[1]["param_groups"] == theirs[1]["param_groups"]
    assert ours[1]["state"].keys() == theirs[1]["state"].keys()
    for name, state in ours[1]["state"].items():
        assert all(torch.equal(value, theirs[1]["state"][name][key]) for key, value in state.items())

    restored, restored_optimizer = build(1)
    _restore_whole(restored, restored_optimizer, {"model": ours[0], "optimizer": ours[1]})
    x = torch.randn(5, 4)
    step(model, optimizer, x)
    step(restored, restored_optimizer, x)
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())


def test_what_runs_in_workers_and_trials_cannot_write_to_mlflow() -> None:
    """Workers and trials report to Ray; only the driver writes MLflow records: the modules whose
    functions Ray runs in workers and trials do not even import MLflow."""
    code = (
        "import sys; import raylens.trainer.ray_train, raylens.tuning.sweep; "
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class Stopper:
    """A monitor that stops after step ``step`` or after epoch ``epoch``, and counts its calls."""

    def __init__(self, every: int, step: int | None = None, epoch: int | None = None) -> None:
        self.every, self.step, self.epoch = every, step, epoch
        self.steps_seen: list[int] = []

    def on_step(self, view: StepView) -> Decision:
        self.steps_seen.append(view.step)
        return Decision(Action.STOP, "asked") if view.step == self.step else GO_ON

    def on_epoch(self, metrics: dict[str, float]) -> Decision:
        return Decision(Action.STOP, "enough") if metrics["epoch"] == self.epoch else GO_ON


def test_a_monitor_sees_every_nth_step_and_its_stop_ends_the_run(iris: FeatureSet) -> None:
    steps_per_epoch = -(-len(iris.read("train")) // 16)  # 90 rows, batch 16
    at_step = Stopper(every=2, step=steps_per_epoch + 4)
    reporter = Collect()
    result = run_worker(job(iris, 5), iris.read("train"), iris.read("valid"), reporter, monitors=[at_step])
    assert at_step.steps_seen == list(range(2, steps_per_epoch + 5, 2))
    assert (result.epochs, result.stopped_at_step) == (1, steps_per_epoch + 4)
    assert result.stopped == Decision(Action.STOP, "asked")
    assert [m["epoch"] for m in reporter.metrics] == [1.0]  # the unfinished epoch is not reported

    after_epoch = Collect()
    result = run_worker(
        job(iris, 5), iris.read("train"), iris.read("valid"), after_epoch, monitors=[Stopper(1, epoch=3)]
    )
    assert result.epochs == 3 and result.stopped is not None and result.stopped.reason == "enough"
    assert [m["epoch"] for m in after_epoch.metrics] == [1.0, 2.0, 3.0]
    assert run_worker(job(iris, 2), iris.read("train"), iris.read("valid"), Collect()).stopped is None
