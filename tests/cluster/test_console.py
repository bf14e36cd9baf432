"""What the terminal shows (rendered to a string; no Ray)."""

from io import StringIO

from rich.console import Console

from raylens.cluster.console import RichProgress, summary_table
from raylens.cluster.experiment import RunSummary
from raylens.features import FeatureSet
from raylens.tuning.tracking import TrialEvent


def rendered(renderable: object) -> str:
    out = StringIO()
    Console(file=out, width=200).print(renderable)
    return out.getvalue()


def test_the_summary_names_the_command_that_ran_and_prints_values_verbatim(iris: FeatureSet) -> None:
    summary = RunSummary("iris", "iris/20261129-1", iris, "sqlite:////data/[team]/mlflow.db", "root")
    shown = rendered(summary_table(summary, "train"))
    assert "raylens train iris/20261129-1" in shown
    assert "sqlite:////data/[team]/mlflow.db" in shown


def test_the_trials_bar_shows_the_best_value_so_far_among_trials_that_ran_to_the_end() -> None:
    def finished(score: float, stopped_early: bool = False) -> TrialEvent:
        return TrialEvent("completed", "t", {"lr": 0.1}, {"valid_loss": score}, stopped_early)

    progress = RichProgress(Console(file=StringIO()), "valid_loss", "min")
    for event in (finished(0.5), finished(0.2, stopped_early=True), finished(0.4), finished(0.45)):
        progress.trial(event)
    assert progress.best == 0.4
    accuracy = RichProgress(Console(file=StringIO()), "valid_accuracy", "max")
    for score in (0.8, 0.9, 0.85):
        accuracy.trial(TrialEvent("completed", "t", {}, {"valid_accuracy": score}))
    assert accuracy.best == 0.9


def test_notices_print_verbatim() -> None:
    out = StringIO()
    RichProgress(Console(file=out, width=200)).notice("resuming from [bold]run[/] with data.drop: [plan]")
    assert "resuming from [bold]run[/] with data.drop: [plan]" in out.getvalue()
