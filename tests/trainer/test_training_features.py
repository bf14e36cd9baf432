"""What users of a plain PyTorch loop expect, in raylens' loop: learning-rate schedules with
warmup (resumable), gradient accumulation, clipping with the norm recorded, bf16 autocast, early
stopping, and rows dealt anew to the ranks every epoch. In-process, no Ray."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from raylens.features import FeatureSet
from raylens.trainer import TorchModelConfig, TrainConfig, TrainJob, TrainState, build_model, run_worker
from raylens.trainer.config import EarlyStoppingConfig, ScheduleConfig
from raylens.trainer.job import shard_rows
from raylens.trainer.monitors import EarlyStopping
from raylens.trainer.schedules import learning_rate
from tests.trainer.test_loop import Collect


def job(fs: FeatureSet, **train: object) -> TrainJob:
    settings: dict = {"epochs": 4, "batch_size": 16, "optimizer": {"lr": 0.05}, **train}
    return TrainJob.for_feature_set(TorchModelConfig(params={"hidden": [16]}), TrainConfig(**settings), fs)


class Snapshots(Collect):
    """Keeps a copy of each epoch's checkpoint: on one worker the gathered state shares storage
    with the live model (a saved checkpoint is a file; here it is kept in memory)."""

    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        super().report(metrics, state)
        self.states[-1] = copy.deepcopy(self.states[-1])


def trained(fs: FeatureSet, resume_from: dict | None = None, **train: object) -> Collect:
    reporter = Snapshots()
    run_worker(job(fs, **train), fs.read("train"), fs.read("valid"), reporter, resume_from=resume_from)
    return reporter


def torch_rates(scheduler_of, steps: int, peak: float = 0.1) -> list[float]:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = scheduler_of(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedules_are_torchs_and_warmup_rises_to_the_peak() -> None:
    epochs, per_epoch, peak = 5, 10, 0.1
    total = epochs * per_epoch
    cosine = learning_rate(ScheduleConfig(name="cosine", min_lr_ratio=0.1), peak, epochs, per_epoch)
    expected = torch_rates(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, total - 1, eta_min=0.01), total
    )
    np.testing.assert_allclose([cosine(s) for s in range(total)], expected, rtol=1e-9)
    step = learning_rate(ScheduleConfig(name="step", step_epochs=2, gamma=0.5), peak, epochs, per_epoch)
    expected = torch_rates(lambda o: torch.optim.lr_scheduler.StepLR(o, 2 * per_epoch, gamma=0.5), total)
    np.testing.assert_allclose([step(s) for s in range(total)], expected, rtol=1e-9)
    linear = learning_rate(ScheduleConfig(name="linear"), peak, epochs, per_epoch)
    assert linear(0) == peak and linear(total - 1) == pytest.approx(0.0, abs=1e-12)
    warm = learning_rate(ScheduleConfig(name="cosine", warmup_epochs=1), peak, epochs, per_epoch)
    assert [warm(s) for s in (0, 4, 9)] == pytest.approx([0.01, 0.05, 0.1])
    assert warm(10) == pytest.approx(peak) and warm(total - 1) == pytest.approx(0.0, abs=1e-12)


def test_a_scheduled_run_reports_its_rate_and_resumes_on_schedule(iris: FeatureSet) -> None:
    schedule = {"name": "cosine", "warmup_epochs": 1}
    straight = trained(iris, schedule=schedule)
    rates = [m["train_lr"] for m in straight.metrics]
    assert rates[0] == pytest.approx(0.05) and rates == sorted(rates, reverse=True) and rates[-1] < 1e-3
    torch.manual_seed(99)  # whatever the process drew in between must not matter
    resumed = trained(iris, resume_from=straight.states[1], schedule=schedule)
    assert [m["epoch"] for m in resumed.metrics] == [3.0, 4.0]
    assert [m["train_lr"] for m in resumed.metrics] == rates[2:]
    for name, tensor in straight.states[-1]["model"].items():
        assert torch.equal(tensor, resumed.states[-1]["model"][name]), name


def test_evaluation_every_n_steps_checkpoints_mid_epoch_and_resumes_there(iris: FeatureSet) -> None:
    """90 rows in batches of 16: 6 steps an epoch, evaluated after steps 2 and 4 of each as well
    as at its end. Resumed from the checkpoint after step 10 (mid-epoch 2), the run skips the
    batches it trained, and ends with the weights and reports of the uninterrupted one — the
    epoch's train loss and mean gradient norm included."""
    settings = {"epochs": 3, "eval_every_steps": 2, "clip_grad_norm": 0.5, "accumulate_batches": 1}
    straight = trained(iris, **settings)
    assert [m["step"] for m in straight.metrics] == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert [round(m["epoch"], 3) for m in straight.metrics[:3]] == [0.333, 0.667, 1.0]
    mid = straight.metrics[4]
    assert "valid_loss" in mid and "train_loss" not in mid  # an epoch's train loss comes at its end
    assert (straight.states[4]["epoch"], straight.states[4]["step"]) == (1, 10)

    torch.manual_seed(99)  # whatever the process drew in between must not matter
    resumed = trained(iris, resume_from=straight.states[4], **settings)
    timeless = [{k: v for k, v in m.items() if not k.endswith("_per_s")} for m in resumed.metrics]
    assert timeless == [
        {k: v for k, v in m.items() if not k.endswith("_per_s")} for m in straight.metrics[5:]
    ]
    for name, tensor in straight.states[-1]["model"].items():
        assert torch.equal(tensor, resumed.states[-1]["model"][name]), name


def test_accumulated_batches_take_the_step_one_larger_batch_takes(iris: FeatureSet) -> None:
    sgd = {"name": "sgd", "lr": 0.05, "momentum": 0.0}
    whole = trained(iris, epochs=2, batch_size=30, optimizer=sgd)
    accumulated = trained(iris, epochs=2, batch_size=10, accumulate_batches=3, optimizer=sgd)
    for name, tensor in whole.states[-1]["model"].items():
        torch.testing.assert_close(accumulated.states[-1]["model"][name], tensor, rtol=1e-5, atol=1e-6)
    assert accumulated.metrics[-1]["train_loss"] == pytest.approx(whole.metrics[-1]["train_loss"], rel=1e-5)


def test_clipping_bounds_the_step_and_records_the_norm(iris: FeatureSet) -> None:
    sgd = {"name": "sgd", "lr": 1.0, "momentum": 0.0}
    one_step = {"epochs": 1, "batch_size": 1000, "optimizer": sgd}
    free = trained(iris, **one_step)
    clipped = trained(iris, clip_grad_norm=1e-3, **one_step)
    assert "train_grad_norm" not in free.metrics[0]
    norm = clipped.metrics[0]["train_grad_norm"]
    assert norm > 1e-3  # the norm before clipping is what is recorded
    torch.manual_seed(0)  # run_worker's seed: the weights it started from
    start = build_model(job(iris).model, 4, 3).state_dict()
    moved = torch.cat([(clipped.states[0]["model"][k] - start[k]).flatten() for k in start])
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-3)  # lr 1 x the clipped norm


def test_bf16_autocast_trains_in_float32_weights(iris: FeatureSet) -> None:
    full = trained(iris, epochs=3)
    half = trained(iris, epochs=3, precision="bf16")
    assert half.metrics[-1]["train_loss"] < half.metrics[0]["train_loss"]
    assert half.metrics[-1]["train_loss"] != full.metrics[-1]["train_loss"]  # autocast did run
    assert all(t.dtype == torch.float32 for t in half.states[-1]["model"].values())


def test_early_stopping_counts_epochs_without_improvement(iris: FeatureSet) -> None:
    rule = EarlyStopping(EarlyStoppingConfig(metric="valid_loss", patience=2, min_delta=0.01))
    decisions = [rule.on_epoch({"valid_loss": v}).action for v in (1.0, 0.95, 0.945, 0.96, 0.5)]
    assert [d.value for d in decisions] == ["continue", "continue", "continue", "stop", "continue"]
    maximize = EarlyStopping(EarlyStoppingConfig(metric="valid_accuracy", mode="max", patience=1))
    assert maximize.on_epoch({"valid_accuracy": 0.5}).action.value == "continue"
    assert maximize.on_epoch({"valid_accuracy": float("nan")}).action.value == "stop"

    never_better = {"metric": "valid_loss", "patience": 2, "min_delta": 1e9}
    reporter = Collect()
    result = run_worker(
        job(iris, epochs=10, early_stopping=never_better), iris.read("train"), iris.read("valid"), reporter
    )
    assert result.epochs == 3 and [m["epoch"] for m in reporter.metrics] == [1.0, 2.0, 3.0]
    assert result.stopped is not None and "has not improved" in result.stopped.reason


def test_each_epoch_deals_the_rows_to_the_ranks_anew() -> None:
    epochs = [[shard_rows(101, rank, 2, seed=3, epoch=e) for rank in range(2)] for e in range(3)]
    for shards in epochs:
        assert len(shards[0]) == len(shards[1]) == 50 and not set(shards[0]) & set(shards[1])
    assert set(epochs[0][0]) != set(epochs[1][0])  # a rank sees other rows next epoch
    assert np.array_equal(shard_rows(101, 1, 2, seed=3, epoch=2), epochs[2][1])  # and the same on resume


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"epochs": 3, "schedule": {"name": "cosine", "warmup_epochs": 3}}, "must end before the run does"),
        ({"epochs": 3, "schedule": {"name": "step"}}, "needs the epochs between decays"),
        ({"epochs": 3, "schedule": {"name": "step", "step_epochs": 5}}, "would never decay"),
        ({"clip_grad_norm": 0}, "greater than 0"),
        ({"accumulate_batches": 0}, "greater than or equal to 1"),
    ],
)
def test_settings_that_cannot_work_are_refused(train: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**train)


def test_a_diverged_loss_fails_the_run_with_the_step_and_what_to_try(iris: FeatureSet) -> None:
    from raylens.trainer.family import TrainingFailed
    from raylens.trainer.job import raise_if_failed

    reporter = Collect()
    exploding = job(iris, epochs=50, optimizer={"name": "sgd", "lr": 1e6, "momentum": 0.9})
    result = run_worker(exploding, iris.read("train"), iris.read("valid"), reporter)
    assert result.stopped is not None and result.stopped.action.value == "fail"
    assert result.epochs < 50
    diverged = r"the training loss became (nan|inf) (at step \d+|in epoch \d+)"
    with pytest.raises(TrainingFailed, match=diverged):
        raise_if_failed(result)
    assert "Lower train.optimizer.lr, set train.clip_grad_norm" in result.stopped.reason
