"""A sweep's trial of one worker, as its process runs it: kept apart from ``sweep`` so the
process imports only what the trial needs (a scikit-learn trial never imports torch, the
seconds it takes to start a process).
"""

from __future__ import annotations

import os
import resource
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import tune

from raylens.features import SplitArrays
from raylens.trainer.family import StoppedByRule, TrainJob, family_of
from raylens.tuning.candidates import Candidate, spec_values
from raylens.tuning.space import with_overrides


def report_to_tune(metrics: dict[str, float], folder: Path | None) -> None:
    """A trial's epoch to Tune, with the state the family saved in ``folder`` as its checkpoint,
    so a resumed sweep continues trials (and the leaderboard measures the model), and the trial
    process's resident memory (``train_rss_mb``, a cost the leaderboard shows as its largest)."""
    tune.report(
        {**metrics, "train_rss_mb": resident_mb()},
        checkpoint=tune.Checkpoint.from_directory(folder) if folder is not None else None,
    )


def job_of_trial(job: TrainJob, config: dict[str, Any], candidates: list[Candidate]) -> TrainJob:
    """The job with a trial's candidate and sampled values; validated after epochs only, as the
    halving rule counts its rungs in reports."""
    model, train_config = with_overrides(job.model, job.train, spec_values(config, candidates))
    return replace(job, model=model, train=train_config.model_copy(update={"eval_every_steps": None}))


def run_trial(
    config: dict[str, Any],
    *,
    job: TrainJob,
    candidates: list[Candidate],
    train: SplitArrays,
    valid: SplitArrays,
) -> None:
    """A trial of one worker: Tune's function trainable, in a process Tune reuses from trial to
    trial. Its family trains it on the shared arrays and reports each epoch with a checkpoint;
    it goes on from the checkpoint Tune hands it (a resumed sweep, a retry, PBT)."""
    trial_job = job_of_trial(job, config, candidates)
    family = family_of(trial_job.model)
    # Tune retries an errored trial (tune.trial_retries); one a debugger rule stopped is not to
    # train again: its retry ends at once, stopped for the same reason.
    stopped = Path(tune.get_context().get_trial_dir()) / STOPPED_BY_RULE
    if stopped.is_file():
        raise StoppedByRule(stopped.read_text())
    checkpoint = tune.get_checkpoint()
    try:
        # A diverged trial fails with its reason (the trial's error); the sweep goes on.
        if checkpoint is None:
            family.run_trial(trial_job, train, valid, report_to_tune, None)
            return
        with checkpoint.as_directory() as folder:
            family.run_trial(trial_job, train, valid, report_to_tune, Path(folder))
    except StoppedByRule as exc:
        stopped.write_text(str(exc))
        raise


STOPPED_BY_RULE = "stopped_by_rule.txt"
"""In a trial's folder: why a debugger rule stopped it (read by the trial's retry)."""


def resident_mb() -> float:
    """This process's resident memory now, in MB: what a reused trial actor holds for its trial
    (its lifetime peak would carry earlier trials' peaks)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):  # not Linux: the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
