"""The halving rule decides the same whatever order results arrive in (no Ray cluster needed:
Tune's scheduler interface is driven directly, as Tune's controller would)."""

import random
from types import SimpleNamespace
from typing import Any

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raylens.tuning.halving import HalvingRule, OrderedHalvingScheduler

MAX_T = 8


def curves(seed: int, trials: int) -> list[list[float]]:
    """Validation loss per epoch for each trial: noisy, some diverging, so the rule has work."""
    rng = random.Random(seed)
    out = []
    for _ in range(trials):
        start, rate = rng.uniform(1, 2), rng.uniform(-0.2, 0.3)
        out.append([start * (1 - rate) ** epoch + rng.uniform(0, 0.05) for epoch in range(1, MAX_T + 1)])
    return out


def simulate(
    scheduler: Any, losses: list[list[float]], concurrency: int, order_seed: int
) -> dict[int, list[float]]:
    """Run the trials through ``scheduler`` as Tune would: trials start in order as slots free,
    and each next result comes from a running trial chosen at random (the timing)."""
    rng = random.Random(order_seed)
    waiting = list(range(len(losses)))
    running: dict[int, Any] = {}
    reported: dict[int, list[float]] = {}
    for number in waiting:
        scheduler.on_trial_add(None, _trial(number))
    while waiting or running:
        while waiting and len(running) < concurrency:
            number = waiting.pop(0)
            running[number] = _trial(number)
            reported[number] = []
        number = rng.choice(sorted(running))
        trial = running[number]
        epoch = len(reported[number]) + 1
        reported[number].append(losses[number][epoch - 1])
        result = {"training_iteration": epoch, "valid_loss": losses[number][epoch - 1]}
        action = scheduler.on_trial_result(None, trial, result)
        if action == TrialScheduler.STOP or epoch == MAX_T:
            scheduler.on_trial_complete(None, trial, result)
            del running[number]
    return reported


def _trial(number: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"a1b2c_{number:05d}", path=None, status="RUNNING", config={})


def outcome(rule: HalvingRule, reported: dict[int, list[float]]) -> tuple[frozenset[int], int]:
    """Trials the rule stops, judged on what they reported, and the best trial that was not stopped."""
    scores = {n: {e: -v for e, v in enumerate(values, 1)} for n, values in reported.items()}
    decisions = rule.decide(scores, set(reported))
    stopped = frozenset(n for n, d in decisions.items() if d.stopped_at is not None)
    best = min((n for n in reported if n not in stopped), key=lambda n: (reported[n][-1], n))
    return stopped, best


def ordered(rule: HalvingRule) -> OrderedHalvingScheduler:
    return OrderedHalvingScheduler(rule, "valid_loss", "min")


def test_milestones_are_ashas_below_the_budget() -> None:
    assert HalvingRule.for_budget(8, 1, 2).milestones == (1, 2, 4)
    assert HalvingRule.for_budget(3, 1, 2).milestones == (1, 2)
    assert HalvingRule.for_budget(20, 2, 3).milestones == (2, 6, 18)
    assert HalvingRule.for_budget(1, 1, 2).milestones == ()


@pytest.mark.parametrize("concurrency", [2, 3, 4])
def test_stopped_trials_and_best_do_not_depend_on_arrival_order(concurrency: int) -> None:
    rule = HalvingRule.for_budget(MAX_T, 1, 2)
    for seed in range(6):
        losses = curves(seed, trials=8)
        sequential = outcome(rule, simulate(ordered(rule), losses, concurrency=1, order_seed=0))
        assert sequential[0], "the rule must stop some trials here, or the test proves nothing"
        for order_seed in range(12):
            reported = simulate(ordered(rule), losses, concurrency, order_seed)
            assert outcome(rule, reported) == sequential, (seed, order_seed)
            # Every trial the rule keeps ran its whole budget; a stopped one stopped at most a few
            # epochs after its milestone (it trained on while an earlier trial's result was due).
            stopped, _ = sequential
            assert all(len(reported[n]) == MAX_T for n in reported if n not in stopped)
            # ...and the scheduler does stop them (a scheduler that never stops would pass the rest).
            assert any(len(reported[n]) < MAX_T for n in stopped)


def test_the_rule_is_ashas_when_results_come_in_trial_order() -> None:
    """With one trial at a time, Ray's ASHA and the rule stop the same trials at the same epoch."""
    rule = HalvingRule.for_budget(MAX_T, 1, 2)
    for seed in range(10):
        losses = curves(seed, trials=8)
        ray_asha = ASHAScheduler(
            metric="valid_loss", mode="min", max_t=MAX_T, grace_period=1, reduction_factor=2
        )
        theirs = simulate(ray_asha, losses, concurrency=1, order_seed=0)
        ours = simulate(ordered(rule), losses, concurrency=1, order_seed=0)
        assert {n: len(v) for n, v in ours.items()} == {n: len(v) for n, v in theirs.items()}


def test_rays_asha_depends_on_arrival_order() -> None:
    """Why the rule exists: the same sweep under Ray's ASHA stops different trials by timing."""
    seen = set()
    for order_seed in range(25):
        asha = ASHAScheduler(metric="valid_loss", mode="min", max_t=MAX_T, grace_period=1, reduction_factor=2)
        reported = simulate(asha, curves(0, trials=8), concurrency=3, order_seed=order_seed)
        seen.add(frozenset(n for n, v in reported.items() if len(v) < MAX_T))
    assert len(seen) > 1


def test_a_judgement_waits_for_an_earlier_trial() -> None:
    rule = HalvingRule((1, 2), 2)
    # Trial 1 is worse than trial 0 at epoch 1, but trial 0 has not reported yet: no stop.
    assert rule.decide({0: {}, 1: {1: -5.0}}, ended=set())[1].pending
    assert rule.decide({0: {1: -1.0}, 1: {1: -5.0}}, ended=set())[1].stopped_at == 1
    # Trial 0 failed before epoch 1: it never reaches the milestone and trial 1 is judged alone.
    assert rule.decide({0: {}, 1: {1: -5.0}}, ended={0})[1].stopped_at is None


def test_a_resumed_scheduler_reads_the_results_trials_reported_before(tmp_path: Any) -> None:
    (tmp_path / "result.json").write_text(
        '{"training_iteration": 1, "valid_loss": 0.5}\n{"training_iteration": 2, "valid_loss": 0.4}\n'
    )
    scheduler = ordered(HalvingRule((1, 2), 2))
    done = SimpleNamespace(trial_id="x_00000", path=str(tmp_path), status="TERMINATED")
    scheduler.on_trial_add(None, done)
    assert scheduler.scores == {0: {1: -0.5, 2: -0.4}} and scheduler.ended == {0}
    worse = _trial(1)
    scheduler.on_trial_add(None, worse)
    assert scheduler.on_trial_result(None, worse, {"training_iteration": 1, "valid_loss": 0.9}) == "STOP"
