"""What the terminal shows: a line per stage, progress bars for the sweep and the epochs, and a
closing summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from raylens.cluster.experiment import RunSummary
from raylens.features import FeatureSet


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RichProgress:
    """The CLI's ``Progress``: one bar for the sweep's trials, one for the final run's epochs."""

    def __init__(self, console: Console, metric: str = "valid_loss") -> None:
        self.console = console
        self.metric = metric
        self.bar: Progress | None = None
        self.task: Any = None
        self.done = 0

    def stage(self, title: str) -> None:
        self.console.print(f"[bold]▸ {title}[/]")

    def notice(self, text: str) -> None:
        self.console.print(f"  [yellow]note:[/] {text}", highlight=False)

    def feature_set(self, feature_set: FeatureSet) -> None:
        rows = feature_set.manifest["rows"]
        self.console.print(
            f"  feature set [cyan]{feature_set.name}@{feature_set.version}[/] "
            f"({feature_set.task}; {len(feature_set.feature_columns)} features; "
            f"rows train {rows['train']} / valid {rows['valid']} / test {rows['test']})"
        )

    def sweep_started(self, trials: int) -> None:
        self._start("trials", trials)

    def trial(self, event: Any) -> None:
        if event.kind not in ("completed", "failed"):
            return
        self.done += 1
        score = event.metrics.get(self.metric)
        config = ", ".join(f"{k.rsplit('.', 1)[-1]}={_format(v)}" for k, v in event.config.items())
        outcome = (
            "[red]failed[/]"
            if event.kind == "failed"
            else (f"{self.metric} {_format(score)}" + (" (stopped early)" if event.stopped_early else ""))
        )
        self.console.print(f"  trial {event.trial_id}: {config} → {outcome}")
        self._advance("failed" if event.kind == "failed" else f"{self.metric} {_format(score)}")

    def sweep_finished(self) -> None:
        self._stop()

    def training_started(self, epochs: int, workers: int) -> None:
        self.console.print(f"  {workers} worker{'s' if workers > 1 else ''}, {epochs} epochs")
        self._start("epochs", epochs)

    def epoch(self, metrics: dict[str, float]) -> None:
        shown = {k: v for k, v in metrics.items() if k in ("valid_loss", "valid_accuracy", "valid_rmse")}
        self._advance(
            "  ".join(f"{k} {_format(v)}" for k, v in shown.items()), completed=int(metrics["epoch"])
        )

    def training_finished(self) -> None:
        self._stop()

    def _start(self, description: str, total: int) -> None:
        self.done = 0
        self.bar = _bar(self.console)
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, status="")

    def _advance(self, status: str, completed: int | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done if completed is None else completed, status=status)

    def _stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def summary_table(summary: RunSummary) -> Table:
    table = Table(title=f"raylens run {summary.run_name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("feature set", f"{summary.feature_set.name}@{summary.feature_set.version}")
    if summary.trials:
        table.add_row(
            "sweep",
            f"{summary.trials} trials"
            + (f", {summary.concurrency.concurrency} at a time" if summary.concurrency else ""),
        )
        table.add_row("best config", ", ".join(f"{k}={_format(v)}" for k, v in summary.best_config.items()))
    final = summary.final
    if final is not None:
        for key, value in final.test_metrics.items():
            table.add_row(key, _format(value))
        if final.registered_version:
            table.add_row("model", f"models:/{final.registered_name}/{final.registered_version}")
        elif final.model_uri:
            table.add_row("model", final.model_uri)
        table.add_row("run id", final.run_id)
    table.add_row("tracking", summary.tracking_uri)
    return table
