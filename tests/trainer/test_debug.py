"""The debugger on real PyTorch training, in this process: each rule fires on the pathology it
names (planted in a small model or data path) and a healthy run fires none; stop and fail end
the run with the finding as the reason."""

from __future__ import annotations

import io
import itertools
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from raylens.features import FeatureSet, SplitArrays
from raylens.storage import Location
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob
from raylens.trainer.config import OptimizerConfig
from raylens.trainer.debug.capture import Capture, initial_scales, step_signals
from raylens.trainer.debug.debugger import (
    FINDINGS_FILE,
    LAYERS_FILE,
    STEPS_FILE,
    TENSORS_FILE,
    TRACE_FILE,
    Debugger,
    findings_of,
)
from raylens.trainer.debug.report import run_debug
from raylens.trainer.debug.rules import (
    Finding,
    class_imbalance,
    cpu_bottleneck,
    low_gpu_utilization,
    poor_weight_initialization,
)
from raylens.trainer.debug.settings import (
    ClassImbalance,
    CpuBottleneck,
    DebugConfig,
    LowGpuUtilization,
    PoorWeightInitialization,
)
from raylens.trainer.decisions import Action
from raylens.trainer.family import TrainingFailed
from raylens.trainer.job import run_worker
from raylens.trainer.loop import Batches, FitResult, TrainState, evaluate, fit
from raylens.trainer.parallel.checkpoint import load_checkpoint, read_attachments, write_checkpoint
from raylens.trainer.run import train_and_record
from raylens.trainer.task import TaskSpec
from raylens.trainer.tracking import MlflowTracker
from tests.trainer.test_classification import bundled

CLASSES = TaskSpec("classification", num_classes=2)


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> FeatureSet:
    return bundled("breast_cancer", tmp_path_factory.mktemp("cancer"))


class _Kept:
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        self.metrics.append(metrics)


def _data(rows: int = 512, seed: int = 0) -> Batches:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return Batches(x, y)


def watch(
    model: nn.Module,
    *,
    rules: dict[str, Any] | None = None,
    train: Batches | None = None,
    valid: Batches | None = None,
    epochs: int = 3,
    lr: float = 1e-2,
    optimizer: str = "adam",
    every: int = 4,
    batch_size: int = 32,
    task: TaskSpec = CLASSES,
) -> tuple[Debugger, FitResult, list[Finding]]:
    """Train ``model`` with the debugger watching every ``every`` steps; its findings as heard."""
    torch.manual_seed(0)
    train = train or _data()
    valid = valid or _data(256, seed=1)
    config = DebugConfig(every=every, rules=rules or {})
    make = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = make(model.parameters(), lr=lr)
    heard: list[Finding] = []
    debugger = Debugger(config, model, opt, on_finding=heard.append)
    result = fit(
        model,
        opt,
        train,
        task,
        epochs=epochs,
        batch_size=batch_size,
        seed=0,
        reporter=_Kept(),
        validate=lambda: evaluate(model, valid, task),
        monitors=[debugger],
        heartbeat=debugger,
    )
    return debugger, result, heard


def fired(debugger: Debugger) -> set[str]:
    return {f.rule for f in debugger.findings}


def mlp(*widths: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def test_a_healthy_run_fires_no_rule_and_keeps_its_capture() -> None:
    debugger, result, heard = watch(mlp(8, 32, 32, 2))
    assert fired(debugger) == set() and heard == [] and result.stopped is None
    files = debugger.files()
    assert findings_of(files) == []
    layers = pq.read_table(io.BytesIO(files[LAYERS_FILE])).to_pylist()
    steps = pq.read_table(io.BytesIO(files[STEPS_FILE])).to_pylist()
    # 16 steps per epoch, 3 epochs, a capture armed every 4 steps and read 4 later.
    assert len(steps) == 11 and {row["layer"] for row in layers} >= {"0", "1", "2", "3", "4"}
    weights = [row for row in layers if row["kind"] == "weights"]
    assert all(row["grad_norm"] > 0 and 1e-5 < row["update_ratio"] < 0.1 for row in weights)
    relu = [row for row in layers if row["kind"] == "relu"]
    assert relu and all(0.1 < row["zero"] < 0.9 for row in relu)
    assert all(row["batches"] >= 4 and row["forward"] > 0 and row["backward"] > 0 for row in steps)


def test_a_deep_sigmoid_stack_has_vanishing_gradients() -> None:
    debugger, _, heard = watch(mlp(8, *[32] * 12, 2, act=nn.Sigmoid), epochs=1, optimizer="sgd")
    assert "vanishing_gradient" in fired(debugger)
    finding = next(f for f in heard if f.rule == "vanishing_gradient")
    assert "0" in finding.evidence.split("smallest: ")[1] and "ReLU" in finding.fix


def test_a_learning_rate_far_too_high_explodes() -> None:
    debugger, *_ = watch(mlp(8, 32, 2), lr=1e4, optimizer="sgd", epochs=1)
    assert "exploding_tensor" in fired(debugger)


def test_large_initial_weights_saturate_tanh() -> None:
    model = mlp(8, 64, 64, 2, act=nn.Tanh)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(20)
    debugger, *_ = watch(model, epochs=1, lr=1e-4)
    finding = next(f for f in debugger.findings if f.rule == "saturated_activation")
    assert "tanh" in finding.evidence


def test_a_large_negative_bias_kills_relus() -> None:
    model = mlp(8, 32, 32, 2)
    first = model[0]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        first.bias.fill_(-20.0)
    debugger, *_ = watch(model, epochs=1)
    assert "dead_relu" in fired(debugger)


def test_training_on_a_tiny_subset_overfits() -> None:
    tiny = _data(24, seed=5)
    noisy = Batches(tiny.x, torch.randint(0, 2, (24,), generator=torch.Generator().manual_seed(3)))
    debugger, _, heard = watch(mlp(8, 256, 256, 2), train=noisy, epochs=30, lr=3e-3, batch_size=8)
    assert "overfit" in fired(debugger)
    assert "train.early_stopping" in next(f for f in heard if f.rule == "overfit").fix


class _SlowRows(torch.Tensor):
    """Rows whose gathering sleeps: a data path slower than the model."""

    def __getitem__(self, index: Any) -> torch.Tensor:
        time.sleep(0.01)
        return torch.Tensor.__getitem__(self.as_subclass(torch.Tensor), index)


def test_a_data_path_that_sleeps_is_an_io_bottleneck() -> None:
    data = _data(256)
    slow = Batches(data.x.as_subclass(_SlowRows), data.y)
    # Three epochs: captures past the first steps, whose start-up can outweigh the sleeps on a
    # loaded machine.
    debugger, *_ = watch(mlp(8, 16, 2), train=slow, epochs=3)
    assert "io_bottleneck" in fired(debugger)
    assert "io_bottleneck" not in fired(watch(mlp(8, 16, 2), epochs=1)[0])


class _Leaky(nn.Module):
    """Keeps every batch's activations alive: memory grows with each step."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = mlp(8, 16, 2)
        self.kept: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.kept.append(torch.ones(4 * 2**20 // 4))  # 4 MiB a step
        return self.inner(x)


def test_a_model_that_leaks_memory_per_step_grows_memory() -> None:
    rules = {"growing_memory": {"mb": 40, "captures": 3}}
    debugger, *_ = watch(_Leaky(), rules=rules, epochs=2)
    assert "growing_memory" in fired(debugger)


def test_a_stop_rule_ends_the_run_as_stopped_and_fail_as_failed() -> None:
    deep = lambda: mlp(8, *[32] * 12, 2, act=nn.Sigmoid)  # noqa: E731
    _, stopped, _ = watch(deep(), rules={"vanishing_gradient": "stop"}, optimizer="sgd")
    assert stopped.stopped is not None and stopped.stopped.action is Action.STOP
    assert stopped.stopped.rule == "vanishing_gradient" and stopped.epochs == 0
    _, failed, _ = watch(deep(), rules={"vanishing_gradient": "fail"}, optimizer="sgd")
    assert failed.stopped is not None and failed.stopped.action is Action.FAIL
    assert failed.stopped.reason.startswith("debug rule vanishing_gradient at step 5")
    debugger, quiet, heard = watch(deep(), rules={"vanishing_gradient": "record"}, optimizer="sgd", epochs=1)
    assert quiet.stopped is None and "vanishing_gradient" in fired(debugger)
    assert "vanishing_gradient" not in {f.rule for f in heard}  # recorded, not said


def test_only_the_layers_named_are_captured() -> None:
    model = mlp(8, 16, 16, 2)
    opt = torch.optim.Adam(model.parameters())
    debugger = Debugger(DebugConfig(layers=["2"]), model, opt)
    assert set(debugger.capture.weighted) == {"2"} and set(debugger.capture.activation_modules) == set()


def test_findings_are_kept_in_the_files_of_every_report() -> None:
    debugger, *_ = watch(mlp(8, *[32] * 12, 2, act=nn.Sigmoid), epochs=1, optimizer="sgd")
    kept = findings_of(debugger.files())
    assert [f.rule for f in kept] == [f.rule for f in debugger.findings] and FINDINGS_FILE.endswith(".json")


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ({"dead_relu": {"fraction": "lots"}}, "valid number"),
        ({"overfit": "explode"}, "off"),
        ({"update_ratio": {"low": 1, "high": 0.5}}, "below high"),
    ],
)
def test_bad_rule_settings_are_refused(rules: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        DebugConfig(rules=rules)


def _recorded_run(
    tracker: MlflowTracker, folder: Path, debug: DebugConfig, fs: FeatureSet, epochs: int
) -> tuple[str, BaseException | None]:
    job = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16]}),
        TrainConfig(epochs=epochs, batch_size=64, debug=debug, optimizer=OptimizerConfig(name="sgd", lr=1e3)),
        fs,
    )
    started: list[str] = []
    error = None
    try:
        train_and_record(
            job,
            fs,
            tracker=tracker,
            run_name="final",
            storage_path=Location.of(folder),
            params={},
            tags={},
            on_run_started=started.append,
            embedded=True,
        )
    except TrainingFailed as exc:
        error = exc
    return started[0], error


def test_a_run_keeps_its_findings_in_mlflow_and_a_fail_rule_fails_it_with_the_finding(
    cancer: FeatureSet, tmp_path: Path
) -> None:
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "debug", tmp_path / "artifacts")
    run_id, error = _recorded_run(tracker, tmp_path / "warn", DebugConfig(every=2), cancer, epochs=1)
    assert error is None
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and "exploding_tensor" in run.data.tags["raylens.debug.findings"]
    record = run_debug(tracker.client, run_id)
    assert record.findings[0].rule == "exploding_tensor" and record.timeline
    assert record.report_uri is not None and all(0 <= row["data"] <= 1 for row in record.timeline)

    fail = DebugConfig(every=2, rules={"exploding_tensor": "fail"})
    run_id, error = _recorded_run(tracker, tmp_path / "fail", fail, cancer, epochs=2)
    assert error is not None and str(error).startswith("debug rule exploding_tensor at step 3")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["raylens.error"] == str(error)


class _Checkpoints:
    """Writes each epoch's checkpoint (with its attachments) as a worker does."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.written = folder, []  # type: ignore[var-annotated]

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        folder = self.folder / f"epoch{state.epoch}"
        write_checkpoint(state, folder)
        self.written.append(folder)


def test_a_resumed_run_keeps_the_capture_and_findings_from_before_the_interruption(
    cancer: FeatureSet, tmp_path: Path
) -> None:
    fs = cancer
    debug = DebugConfig(every=3, rules={"update_ratio": {"action": "record", "low": 1e-12, "high": 1e-9}})

    def job(epochs: int) -> TrainJob:
        return TrainJob.for_feature_set(
            TorchModelConfig(params={"hidden": [16]}),
            TrainConfig(epochs=epochs, batch_size=32, debug=debug),
            fs,
        )

    train, valid = fs.read("train"), fs.read("valid")
    whole = _Checkpoints(tmp_path / "whole")
    run_worker(job(3), train, valid, whole)
    first = _Checkpoints(tmp_path / "first")
    run_worker(job(1), train, valid, first)
    then = _Checkpoints(tmp_path / "then")
    run_worker(job(3), train, valid, then, resume_from=load_checkpoint(first.written[-1]))

    def kept(folder: Path) -> tuple[list[int], list[Finding]]:
        files = read_attachments(folder)
        steps = pq.read_table(io.BytesIO(files[STEPS_FILE])).column("step").to_pylist()
        return steps, findings_of(files)

    assert kept(then.written[-1]) == kept(whole.written[-1])
    steps, findings = kept(then.written[-1])
    assert steps[0] == 4 and [f.rule for f in findings] == ["update_ratio"]  # fired once, before


def test_a_rare_class_is_a_class_imbalance_and_fail_ends_the_run_before_training(cancer: FeatureSet) -> None:
    fs = cancer
    train = fs.read("train")
    rare = np.flatnonzero(train.y == 0)[:8]
    common = np.flatnonzero(train.y == 1)
    rows = np.concatenate([rare, common])
    skewed = SplitArrays(train.x[rows], train.y[rows])
    assert class_imbalance({"0": 8, "1": len(common)}, ClassImbalance()) is not None
    job = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [8]}),
        TrainConfig(epochs=1, batch_size=32, debug=DebugConfig(rules={"class_imbalance": "fail"})),
        fs,
    )
    ended = run_worker(job, skewed, fs.read("valid"), _Kept())
    assert ended.stopped is not None and ended.stopped.action is Action.FAIL and ended.epochs == 0
    assert (
        ended.stopped.reason.startswith("debug rule class_imbalance")
        and "class 0 has 8" in ended.stopped.reason
    )
    balanced = run_worker(job, train, fs.read("valid"), _Kept())
    assert balanced.stopped is None


def test_a_run_past_its_best_validation_is_overtraining() -> None:
    tiny = _data(24, seed=5)
    noisy = Batches(tiny.x, torch.randint(0, 2, (24,), generator=torch.Generator().manual_seed(3)))
    debugger, *_ = watch(mlp(8, 256, 256, 2), train=noisy, epochs=30, lr=3e-3, batch_size=8)
    assert "overtraining" in fired(debugger)
    assert "overtraining" not in fired(watch(mlp(8, 32, 2), epochs=3)[0])


def test_profile_steps_keep_a_torch_profiler_trace_of_those_steps() -> None:
    model = mlp(8, 16, 2)
    opt = torch.optim.Adam(model.parameters())
    debugger = Debugger(DebugConfig(every=2, profile_steps=3), model, opt)
    fit(
        model,
        opt,
        _data(),
        CLASSES,
        epochs=1,
        batch_size=32,
        seed=0,
        reporter=_Kept(),
        monitors=[debugger],
        heartbeat=debugger,
    )
    trace = json.loads(debugger.files()[TRACE_FILE])
    steps = {e["name"] for e in trace["traceEvents"] if "Optimizer.step" in str(e.get("name"))}
    assert steps and any("addmm" in str(e.get("name")) for e in trace["traceEvents"])


def test_the_tensors_of_layers_asked_for_are_kept_at_every_capture() -> None:
    model = mlp(8, 16, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    debugger = Debugger(DebugConfig(every=4, tensors=["2"]), model, opt)
    fit(model, opt, _data(), CLASSES, epochs=1, batch_size=32, seed=0, reporter=_Kept(), monitors=[debugger])
    kept = torch.load(io.BytesIO(debugger.files()[TENSORS_FILE]), weights_only=True)
    assert sorted(kept) == [5, 9, 13] and set(kept[5]) == {
        "2.weight",
        "2.bias",
        "2.weight.grad",
        "2.bias.grad",
    }
    assert kept[5]["2.weight"].shape == (2, 16) and not torch.equal(kept[5]["2.weight"], kept[13]["2.weight"])


def test_weights_initialized_far_too_large_are_a_poor_initialization() -> None:
    model = mlp(8, 64, 64, 2, act=nn.Tanh)
    assert poor_weight_initialization(initial_scales(model), PoorWeightInitialization()) is None
    with torch.no_grad():
        model[2].weight.mul_(20)  # type: ignore[operator]
    found = poor_weight_initialization(initial_scales(model), PoorWeightInitialization())
    assert found is not None and "furthest: 2 " in found


def test_a_model_slow_to_build_is_a_slow_initialization(cancer: FeatureSet) -> None:
    fs = cancer
    debug = DebugConfig(every=2, rules={"slow_initialization": {"seconds": 0.3}})

    def heard(name: str) -> list[Finding]:
        found: list[Finding] = []
        job = TrainJob.for_feature_set(
            TorchModelConfig(name=f"tests.trainer.user_models:{name}"),
            TrainConfig(epochs=1, batch_size=64, debug=debug),
            fs,
        )
        run_worker(job, fs.read("train"), fs.read("valid"), _Kept(), on_finding=found.append)
        return [f for f in found if f.rule == "slow_initialization"]

    slow = heard("slow_to_build")
    assert len(slow) == 1 and "to its first step (limit 0.3 s)" in slow[0].evidence
    assert heard("tiny") == []


def test_gpu_rules_judge_utilization_and_never_fire_without_a_gpu() -> None:
    debugger, *_ = watch(mlp(8, 16, 2), epochs=1)
    measured = debugger.snapshots[-1]
    assert 0 < measured.cpu_util <= 1.5 and math.isnan(measured.gpu_util)  # this machine: no GPU
    starved = replace(measured, cpu_util=0.97, gpu_util=0.05)
    assert cpu_bottleneck(starved, [], CpuBottleneck()) is not None
    assert cpu_bottleneck(measured, [], CpuBottleneck()) is None
    idle = [replace(measured, gpu_util=0.1)] * 3
    assert low_gpu_utilization(idle[-1], idle[:-1], LowGpuUtilization()) is not None
    assert low_gpu_utilization(replace(measured, gpu_util=0.8), idle[:-1], LowGpuUtilization()) is None
    assert low_gpu_utilization(measured, [measured] * 2, LowGpuUtilization()) is None


class _Bowl(nn.Module):
    """The loss 1/2 |theta|^2, the same on every batch: along any step the parabola is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([3.0, -2.0]))

    def loss(self) -> torch.Tensor:
        return 0.5 * (self.theta**2).sum()


@pytest.mark.parametrize("lr", [0.1, 1.0, 1.5, 2.0, 2.5])
def test_alpha_is_where_the_step_ended_on_the_parabola_along_it(lr: float) -> None:
    # SGD on 1/2 |theta|^2 steps by -lr theta: to the minimum at lr 1 (alpha 0), barely moving at
    # a small lr (alpha near -1), to the same loss on the far side at lr 2 (alpha 1): alpha = lr - 1.
    bowl = _Bowl()
    opt = torch.optim.SGD(bowl.parameters(), lr=lr)
    capture = Capture(bowl, opt)
    capture.arm()
    for _ in range(2):  # the captured step, then the one whose gradient ends the reading
        opt.zero_grad()
        bowl.loss().backward()
        opt.step()
    alpha, noise = step_signals(capture.signals())
    assert alpha == pytest.approx(lr - 1)
    # Both gradients are exact: what differs between them is the step's own doing, small for a
    # small step (lr^2 / 2(1 - lr) here), and past the minimum the gradient turned (no estimate).
    assert noise == pytest.approx(lr**2 / (2 * (1 - lr))) if lr < 1 else noise == math.inf
    assert all(map(math.isnan, step_signals(()))), "no reading: no signals"


def _linear_targets(rows: int, seed: int) -> Batches:
    """y = x.w for standard normal x: the MSE's curvature is 2 along every direction, so SGD's
    alpha is 2 lr - 1."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, generator=generator)
    return Batches(x, x @ torch.linspace(-1, 1, 8))


def test_the_step_size_tells_a_learning_rate_far_too_high_from_one_far_too_low() -> None:
    rules = {
        "step_size": {"action": "warn", "captures": 3, "low": -0.95},
        "exploding_tensor": "off",
        "update_ratio": "off",
        "loss_not_decreasing": "off",
    }
    said = {}
    for name, lr in (("high", 1.2), ("healthy", 0.3), ("low", 1e-3)):
        debugger, *_ = watch(
            nn.Linear(8, 1),
            lr=lr,
            optimizer="sgd",
            epochs=3,
            every=2,
            batch_size=128,
            rules=rules,
            train=_linear_targets(512, 0),
            valid=_linear_targets(64, 1),
            task=TaskSpec("regression"),
        )
        said[name] = next((f.evidence for f in debugger.findings if f.rule == "step_size"), None)
        alphas = pq.read_table(io.BytesIO(debugger.files()[STEPS_FILE])).column("alpha").to_pylist()
        measured = statistics.median(a for a in alphas if math.isfinite(a))
        assert measured == pytest.approx(2 * lr - 1, abs=0.2), (name, alphas)
    assert said["high"] is not None and "overshoot" in said["high"], said
    assert said["low"] is not None and "sliver" in said["low"], said
    assert said["healthy"] is None, said


def test_activation_shares_count_the_outputs_near_their_bounds_and_the_zeros() -> None:
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.ReLU(), nn.Sigmoid())
    capture = Capture(model, torch.optim.SGD(model.parameters(), lr=0.1))
    capture.arm()
    x = torch.tensor([[-5.0, -1.0, 0.0, 0.5, 3.0, 10.0]])
    for activation in list(model)[1:]:
        activation(x)
    stats = {s.kind: s for s in capture.captured.values()}
    assert stats["tanh"].saturated == pytest.approx(3 / 6)  # |tanh| >= 0.99: -5, 3, 10
    assert stats["relu"].zero == pytest.approx(3 / 6)  # -5, -1, 0
    assert stats["sigmoid"].saturated == pytest.approx(2 / 6)  # within 0.01 of 0 or 1: -5, 10
    capture.disarm()
