"""Successive halving whose decisions do not depend on the order results arrive.

Ray Tune's ASHA decides when a result arrives: a trial is stopped at a milestone if it trails the
results already recorded there. With several trials running at once, which results are "already
recorded" depends on timing, so two runs of the same seeded sweep can stop different trials and
pick different bests. Here the same rule is applied in *trial order*: trial j at milestone m is
compared with the trials before it (by trial number) that reached m, never with whichever
happened to arrive first. A decision that needs a result not in yet waits for it (the trial trains
on meanwhile and is stopped at its next result), so early stopping may come an epoch or two late,
but which trials are stopped, and so the best configuration, is the same on every run.

:class:`HalvingRule` is the rule as a pure function over the results so far;
:class:`OrderedHalvingScheduler` applies it inside Tune.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

Scores = Mapping[int, Mapping[int, float]]
"""trial number → {iteration: score}, the score sign-adjusted so that higher is better."""

WORST = -1e300
"""The score of a NaN or infinite metric (a diverged trial): below every real one, and still a
number the percentile can interpolate with (NaN would make a diverged trial unstoppable)."""


def score(value: float, mode: str) -> float:
    """``value`` as a score: higher is better, non-finite is worst."""
    if not math.isfinite(value):
        return WORST
    return value if mode == "max" else -value


@dataclass(frozen=True)
class Decision:
    """A trial's fate under the rule so far: stopped at milestone ``stopped_at``, or not; a
    trial that reached a milestone whose judgement waits on an earlier trial is ``pending``."""

    stopped_at: int | None = None
    pending: bool = False


@dataclass(frozen=True)
class HalvingRule:
    """ASHA's rule: at each milestone, only the top 1/reduction_factor go on."""

    milestones: tuple[int, ...]
    reduction_factor: float

    @classmethod
    def for_budget(cls, max_t: int, grace_period: int, reduction_factor: float) -> HalvingRule:
        """Milestones grace·rf^k below ``max_t`` (as Ray's ASHA places them); a trial that
        reaches ``max_t`` has finished, so there is no milestone there."""
        milestones: list[int] = []
        k = 0
        while (t := grace_period * reduction_factor**k) < max_t:
            if not milestones or math.ceil(t) > milestones[-1]:
                milestones.append(math.ceil(t))
            k += 1
        return cls(tuple(milestones), reduction_factor)

    def cutoff(self, earlier: list[float]) -> float | None:
        if not earlier:
            return None
        return float(np.nanpercentile(earlier, (1 - 1 / self.reduction_factor) * 100))

    def decide(self, scores: Scores, ended: Collection[int]) -> dict[int, Decision]:
        """Each trial's decision from the scores reported so far.

        ``scores`` holds every trial created so far (an empty history for one with no result
        yet); ``ended`` the trials that will report nothing more (finished, stopped, failed).
        A trial with no score at a milestone either never reached it (ended) or has not yet
        (pending): the judgement of every later trial at that milestone waits for it.
        """
        reached: dict[int, list[float]] = {m: [] for m in self.milestones}
        unknown_from: dict[int, bool] = {m: False for m in self.milestones}
        decisions: dict[int, Decision] = {}
        for trial in sorted(scores.keys() | set(ended)):
            history = scores.get(trial, {})
            decision = Decision()
            for i, milestone in enumerate(self.milestones):
                value = history.get(milestone)
                if value is None:
                    if trial not in ended:
                        # Not there yet: later trials cannot be judged here until it is.
                        for later in self.milestones[i:]:
                            unknown_from[later] = True
                    break
                if unknown_from[milestone]:
                    decision = Decision(pending=True)
                    for later in self.milestones[i + 1 :]:
                        unknown_from[later] = True
                    break
                cutoff = self.cutoff(reached[milestone])
                reached[milestone].append(value)
                if cutoff is not None and value < cutoff:
                    decision = Decision(stopped_at=milestone)
                    break
            decisions[trial] = decision
        return decisions


def trial_number(trial_id: str, experiment_tag: str = "", default: int = 0) -> int:
    """The order in which the searcher created a trial: what the rule follows. Tune's own
    searcher numbers trial ids (``<prefix>_00003``); others' ids are random, and the trial's
    experiment tag (``3_lr=0.01``) counts them; ``default`` where neither says."""
    prefix, _, number = trial_id.rpartition("_")
    if prefix and number.isdigit():
        return int(number)
    counted = experiment_tag.split("_", 1)[0]
    return int(counted) if counted.isdigit() else default


def _number(trial: Any) -> int:
    return trial_number(trial.trial_id, getattr(trial, "experiment_tag", ""))


class OrderedHalvingScheduler(FIFOScheduler):
    """A Tune scheduler applying :class:`HalvingRule` in trial order (see the module's doc)."""

    def __init__(
        self, rule: HalvingRule, metric: str, mode: str, time_attr: str = "training_iteration"
    ) -> None:
        super().__init__()
        self.rule = rule
        self._metric, self._mode = metric, mode  # Tune's own fields, read by its controller
        self.metric_name, self.mode, self.time_attr = metric, mode, time_attr
        self.scores: dict[int, dict[int, float]] = {}
        self.ended: set[int] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # metric and mode are the spec's, given at construction

    def _record(self, trial: Any, result: Mapping[str, Any]) -> None:
        value, iteration = result.get(self.metric_name), result.get(self.time_attr)
        if isinstance(value, int | float) and isinstance(iteration, int):
            self.scores.setdefault(_number(trial), {})[iteration] = score(value, self.mode)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        # Known from now on: later trials' judgements wait for its first results.
        self.scores.setdefault(_number(trial), {})
        # A resumed sweep hands back its trials with the results they reported before.
        for result in _reported_before(trial):
            self._record(trial, result)
        if trial.status in ("TERMINATED", "ERROR"):
            self.ended.add(_number(trial))

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        self._record(trial, result)
        decision = self.rule.decide(self.scores, self.ended).get(_number(trial))
        if decision is not None and decision.stopped_at is not None:
            return str(TrialScheduler.STOP)
        return str(TrialScheduler.CONTINUE)

    def _end(self, trial: Any) -> None:
        self.ended.add(_number(trial))

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        if result:
            self._record(trial, result)
        self._end(trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._end(trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._end(trial)

    def debug_string(self) -> str:
        return f"Ordered successive halving at {self.rule.milestones}"


def _reported_before(trial: Any) -> list[dict[str, Any]]:
    """The results a trial of a resumed sweep reported before; nothing for a new trial, which
    Tune gives a folder only when it starts."""
    try:
        folder = trial.path
    except RuntimeError:
        return []
    storage = getattr(trial, "storage", None)
    return reported_results(folder, getattr(storage, "storage_filesystem", None))


def reported_results(folder: str | None, filesystem: pyarrow.fs.FileSystem | None) -> list[dict[str, Any]]:
    """Every result a trial reported, in order: the ``result.json`` Tune keeps in the trial's
    folder of the sweep's storage (local or remote)."""
    if not folder:
        return []
    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    try:
        with filesystem.open_input_stream(posixpath.join(folder, "result.json")) as stream:
            text = stream.read().decode()
    except (FileNotFoundError, OSError):
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
