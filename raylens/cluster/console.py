"""What the terminal shows: a line per stage, progress bars for the sweep and the epochs, and a
closing summary table."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.status import Status
from rich.table import Table
from rich.text import Text

from raylens.cluster.checks import CheckReport
from raylens.cluster.experiment import Experiment, RunSummary
from raylens.features import FeatureSet, PlannedFeatureSet, RowsDone
from raylens.features.drift import FeatureSetDiff
from raylens.trainer.debug.report import RunDebug, TrialDebug
from raylens.tuning.leaderboard import Leaderboard


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


def rows_on(status: Status, text: str) -> RowsDone:
    """A feature build's progress told on a spinner's line, after its ``text``."""

    def told(what: str, done: int, total: int | None) -> None:
        status.update(f"{text}: {what}, {done:,}" + (f" of {total:,} rows" if total is not None else " rows"))

    return told


def _unqualified(error: str) -> str:
    """An exception's last line without its module path: ``TrainingFailed: the training loss…``."""
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=\w+: )", "", error)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RichProgress:
    """The CLI's ``Progress``: one bar for the sweep's trials, one for the final run's epochs."""

    def __init__(self, console: Console, metric: str = "valid_loss", mode: str = "min") -> None:
        self.console = console
        self.metric = metric
        self.mode = mode
        self.bar: Progress | None = None
        self.task: Any = None
        self.done = 0
        self.best: float | None = None
        """The sweep's best value of ``metric`` so far among trials that ran to the end."""
        self.data_pass: str | None = None
        """The feature build's pass the bar shows, while one does."""

    def stage(self, title: str) -> None:
        self.console.print(f"[bold]▸ {title}[/]")

    def data_rows(self, what: str, done: int, total: int | None) -> None:
        """A bar per pass of the feature build over the source (rows, of how many if known)."""
        if self.bar is None or self.data_pass != what:
            self._stop()
            self.data_pass = what
            self._start(f"  {what}", total)
        self._advance("rows", completed=done)

    def data_finished(self) -> None:
        if self.data_pass is not None:
            self.data_pass = None
            self._stop()

    def notice(self, text: str) -> None:
        self.console.print(f"  [yellow]note:[/] {escape(text)}", highlight=False)

    def feature_set(self, feature_set: FeatureSet | PlannedFeatureSet) -> None:
        rows = feature_set.manifest.rows
        self.console.print(
            f"  feature set [cyan]{escape(feature_set.name)}@{feature_set.version}[/] "
            f"({feature_set.task}; {len(feature_set.feature_columns)} features; "
            f"rows train {rows['train']} / valid {rows['valid']} / test {rows['test']})"
        )
        if feature_set.manifest.task_decision:
            self.console.print(f"  task {escape(feature_set.manifest.task_decision)}", highlight=False)
        if feature_set.manifest.quarantined:
            self.notice(_quarantine_said(feature_set.manifest.quarantined))

    def sweep_started(self, trials: int) -> None:
        self._start("trials", trials)

    def trial(self, event: Any) -> None:
        if event.kind not in ("completed", "failed"):
            return
        self.done += 1
        score = event.metrics.get(self.metric)
        config = ", ".join(f"{k.rsplit('.', 1)[-1]}={_format(v)}" for k, v in event.config.items())
        outcome = (
            "[red]failed[/]" + (escape(f": {_unqualified(event.error)}") if event.error else "")
            if event.kind == "failed"
            else escape(
                f"{self.metric} {_format(score)}"
                + (" (stopped early)" if event.stopped_early else "")
                + (" (goal reached: the sweep ends)" if event.reached_goal else "")
            )
        )
        self.console.print(f"  trial {escape(event.trial_id)}: {escape(config)} → {outcome}", highlight=False)
        ran_to_the_end = event.kind == "completed" and isinstance(score, float) and not event.stopped_early
        if ran_to_the_end and (
            self.best is None or (score < self.best if self.mode == "min" else score > self.best)
        ):
            self.best = score
        self._advance(f"best {self.metric} {_format(self.best)}" if self.best is not None else "")

    def sweep_finished(self) -> None:
        self._stop()

    def training_started(self, epochs: int, workers: int, parallel: str = "") -> None:
        self.console.print(
            f"  {workers} worker{'s' if workers > 1 else ''}, {epochs} epochs", highlight=False
        )
        if parallel:
            self.console.print(f"  strategy {escape(parallel)}", highlight=False)
        self._start("epochs", epochs)

    def epoch(self, metrics: dict[str, float]) -> None:
        shown = {k: v for k, v in metrics.items() if k in ("valid_loss", "valid_accuracy", "valid_rmse")}
        self._advance(
            "  ".join(f"{k} {_format(v)}" for k, v in shown.items()), completed=int(metrics["epoch"])
        )

    def training_finished(self) -> None:
        self._stop()

    def _start(self, description: str, total: int | None) -> None:
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


def summary_table(summary: RunSummary, command: str = "run") -> Table:
    """What the invocation ended with; its title names the command that ran."""
    table = Table(
        title=Text(f"raylens {command} {summary.run_name}"), show_header=False, title_justify="left"
    )
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths and ids wrap, never cut

    def row(name: str, value: str) -> None:  # values are printed as they are, never as markup
        table.add_row(name, Text(value))

    row("feature set", f"{summary.feature_set.name}@{summary.feature_set.version}")
    if summary.trials:
        row(
            "sweep",
            f"{summary.trials} trials"
            + (f", {summary.concurrency.concurrency} at a time" if summary.concurrency else ""),
        )
        row("best config", ", ".join(f"{k}={_format(v)}" for k, v in summary.best_config.items()))
        row("sweep run id", summary.root_run_id)
        if summary.best_spec is not None:
            row("best spec", str(summary.best_spec))
    final = summary.final
    if final is not None:
        for key, value in final.test_metrics.items():
            if not key.startswith(("test_precision_", "test_recall_")):  # per class: in MLflow
                row(key, _format(value))
        if final.registered_version:
            uri = f"models:/{final.registered_name}/{final.registered_version}"
            row("model", uri if final.registered_now else f"{uri} (identical model: not registered again)")
        elif final.model_uri:
            row("model", final.model_uri)
        row("run id", final.run_id)
    row("tracking", summary.tracking_uri)
    return table


def leaderboard_table(board: Leaderboard, title: str = "leaderboard") -> Group:
    """The leaderboard: ranked trials with their costs, then each candidate's top permutation
    importances and the verdict on the constraints. Narrow enough for 80 columns."""
    table = Table(title=Text(title), title_justify="left", caption=Text(_LEGEND), caption_justify="left")
    table.add_column("#", justify="right")
    table.add_column("candidate", overflow="fold")
    table.add_column(board.metric.removeprefix("valid_"), justify="right")
    for name in ("train s", "p50/p95 ms", "MB", "RSS MB"):
        table.add_column(name, justify="right")
    table.add_column("", overflow="fold")

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    for rank, row in enumerate(board.rows, 1):
        costs = row.costs
        notes = (["Pareto"] if row.pareto else []) + (["front"] if row.trial_id in board.front else [])
        notes += [f"{name} {value:.4g}" for name, value in row.objectives.items()] + row.misses
        table.add_row(
            str(rank),
            Text(f"{row.candidate} {row.trial_id}"),
            f"{row.score:.4g}",
            number(costs.train_seconds),
            f"{number(costs.predict_p50_ms)}/{number(costs.predict_p95_ms)}",
            number(costs.model_mb),
            number(costs.peak_rss_mb),
            Text("; ".join(notes)),
        )
    parts: list[Any] = [table]
    for row in board.rows:
        if row.importances:
            top = ", ".join(f"{name} {drop:.3g}" for name, drop in row.importances)
            parts.append(Text(f"{row.candidate} {row.trial_id}, top permutation importances: {top}"))
    if board.parameter_importances:
        shares = ", ".join(
            f"{name} {share:.2f}" for name, share in list(board.parameter_importances.items())[:6]
        )
        parts.append(Text(f"what mattered (share of {board.metric}'s variance, fANOVA): {shares}"))
    parts.append(Text(board.verdict()))
    return Group(*parts)


def debug_tables(record: RunDebug) -> Group:
    """A run's findings, then its timeline (rank 0's captures): where each batch's time went."""
    parts: list[Any] = [Text(f"run {record.run_id}: {record.status}")]
    if record.stopped_by:
        parts.append(Text(f"stopped by {record.stopped_by}"))
    if record.findings:
        findings = Table(title=Text("findings"), title_justify="left")
        for name in ("rule", "action", "step", "rank", "evidence and fix"):
            findings.add_column(name, overflow="fold")
        for f in record.findings:
            findings.add_row(f.rule, f.action, str(f.step), str(f.rank), Text(f"{f.evidence}. {f.fix}"))
        parts.append(findings)
    else:
        parts.append(Text("no rule fired"))
    if record.timeline:
        timeline = Table(title=Text("timeline (rank 0)"), title_justify="left")

        def shown(key: str) -> bool:
            return any(row.get(key) is not None and row[key] == row[key] for row in record.timeline)

        gpu, comm, signals = shown("gpu_util"), shown("communication"), shown("alpha")
        columns = ["step", "epoch", "ms/batch", "data", "forward", "backward"]
        columns += [*(["all-reduce"] if comm else []), "optimizer", "CPU", *(["GPU"] if gpu else [])]
        for name in [*columns, "RSS MB", *(["alpha", "noise"] if signals else [])]:
            timeline.add_column(name, justify="right")
        for row in record.timeline:
            timeline.add_row(
                str(row["step"]),
                str(row["epoch"]),
                f"{row['ms_per_batch']:.3g}",
                *(f"{row[phase]:.0%}" for phase in ("data", "forward", "backward")),
                *([_share(row["communication"])] if comm else []),
                f"{row['optimizer']:.0%}",
                _share(row["cpu_util"]),
                *([_share(row["gpu_util"])] if gpu else []),
                f"{row['rss_mb']:.0f}",
                *([_number(row["alpha"]), _number(row["gradient_noise"])] if signals else []),
            )
        parts.append(timeline)
    else:
        parts.append(Text("no capture kept (train.debug was off, or the model is not a torch model)"))
    return Group(*parts)


def _share(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.0%}"


def _number(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.2g}"


def sweep_debug_table(trials: list[TrialDebug], title: str) -> Table:
    """Which rules fired in each trial of a sweep, and which trials a rule stopped."""
    table = Table(title=Text(title), title_justify="left")
    for name in ("trial", "status", "rules fired", "stopped by"):
        table.add_column(name, overflow="fold")
    for trial in trials:
        table.add_row(
            Text(trial.name),
            trial.status,
            Text(", ".join(trial.rules) or "none"),
            Text(trial.stopped_by or ""),
        )
    return table


_LEGEND = (
    "train s: training time; p50/p95 ms: one row's prediction; MB: model size; RSS MB: trial "
    "memory; Pareto: no trial is both better and faster; front: no trial is better on every objective"
)


def dry_run_table(experiment: Experiment, report: CheckReport, command: str) -> Table:
    """What ``command`` would do with this spec, after every check passed; nothing was started."""
    spec, planned = experiment.spec, report.planned
    assert planned is not None
    table = Table(
        title=Text(f"raylens {command}: checked, nothing started or written"),
        show_header=False,
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths and ids wrap, never cut

    def row(name: str, value: str) -> None:
        table.add_row(name, Text(value))

    stored = (experiment.workspace.feature_store / planned.name / planned.version).is_dir()
    rows = planned.manifest.rows
    row(
        "feature set",
        f"{planned.name}@{planned.version} ({'stored: reused' if stored else 'new: written by the run'})",
    )
    row(
        "data",
        f"{len(planned.feature_columns)} features; rows {rows['train']}/{rows['valid']}/{rows['test']}",
    )
    row("task", planned.manifest.task_decision or planned.task)
    tune = spec.tune if command != "train" else None
    if tune is not None:
        row(
            "sweep",
            f"{tune.trials} trials, {tune.scheduler}, {tune.mode} {tune.metric}, "
            f"{tune.epochs or spec.train.epochs} epochs each, up to {tune.concurrency} at a time"
            + (
                f", ends at {tune.metric} {'≥' if tune.mode == 'max' else '≤'} {tune.goal:g}"
                if tune.goal is not None
                else ""
            ),
        )
        row("space", ", ".join(f"{k}: {v}" for k, v in tune.space.items()))
    if command != "tune":
        scaling = spec.train.scaling
        row(
            "training",
            f"{spec.train.epochs} epochs, {scaling.shown_workers} worker(s), {scaling.strategy}, "
            f"batch {spec.train.batch_size} per worker"
            + (" (with the sweep's best configuration)" if tune is not None else ""),
        )
    from raylens.trainer.tracking import redact

    row("tracking", redact(experiment.tracking_uri))
    if spec.tracking.register_as and command != "tune":
        row("registers", spec.tracking.register_as)
    return table


def diff_view(diff: FeatureSetDiff) -> Group:
    """``raylens features diff``: what changed from one version to the other, then each feature
    column's drift."""
    parts: list[Any] = [Text(f"{diff.before} → {diff.after}")]
    (rows_a, rows_b) = diff.rows
    parts.append(Text(f"rows (train/valid/test): {_rows(rows_a)} → {_rows(rows_b)}"))
    if diff.schema_changed:
        for column in diff.added:
            parts.append(Text(f"column added: {column}"))
        for column in diff.removed:
            parts.append(Text(f"column removed: {column}"))
        for column, was, now in diff.retyped:
            parts.append(Text(f"column retyped: {column} {was} → {now}"))
    else:
        parts.append(Text("schema: unchanged"))
    parts.extend(Text(change) for change in diff.changes)
    table = _justified_table(
        "drift of the feature columns (training split, raw values)",
        ["column", "PSI", "drift", "KS", "KS p-value", "mean before → after"],
        left={"column", "drift"},
    )
    for d in diff.drift:
        table.add_row(
            Text(d.column),
            f"{d.psi:.3f}",
            d.verdict,
            f"{d.ks:.3f}",
            f"{d.ks_pvalue:.2g}",
            f"{_format(d.mean_before)} → {_format(d.mean_after)}",
        )
    parts.append(table)
    return Group(*parts)


def _justified_table(title: str, names: list[str], left: set[str]) -> Table:
    """A table whose columns are right-justified (numbers) but those in ``left``; cells fold."""
    table = Table(title=title, title_justify="left")
    for name in names:
        table.add_column(name, justify="left" if name in left else "right", overflow="fold")
    return table


def _quarantine_said(counts: dict[str, int]) -> str:
    reasons = "; ".join(f"{reason}: {count}" for reason, count in counts.items())
    return f"{sum(counts.values())} rows set aside by data validation ({reasons})"


def _rows(rows: dict[str, int]) -> str:
    return "/".join(str(rows.get(split, 0)) for split in ("train", "valid", "test"))


def _encoding_said(encoder: dict[str, Any]) -> str:
    column, kind = encoder["column"], encoder["kind"]
    if kind == "one_hot":
        return f"one_hot of {column}: {len(encoder.get('categories', []))} categories and <other>"
    if kind == "ordinal":
        return f"ordinal of {column}: {len(encoder.get('categories', []))} categories, 0 for unknown"
    if kind == "hashing":
        return f"hashing of {column} into {encoder.get('buckets')} buckets"
    if kind == "bucketize":
        return f"bucketize of {column}: {len(encoder.get('boundaries', [])) + 1} buckets"
    return f"{column}:missing, 1 where {column} was missing"


def feature_set_view(feature_set: FeatureSet) -> Group:
    """``raylens features show``: the manifest as a person reads it — where the rows came from,
    the task, the split, the transforms, and one line per feature column (its type and the
    training split's statistics before transforms). ``--json`` gives the manifest itself."""
    manifest = feature_set.manifest
    about = Table(show_header=False, box=None, pad_edge=False)
    about.add_column(style="bold")
    about.add_column(overflow="fold")  # ids and paths wrap, never cut

    def row(name: str, value: str) -> None:
        about.add_row(name, Text(value))

    row("feature set", f"{feature_set.name}@{feature_set.version}")
    row("created", manifest.created_at[:19].replace("T", " ") + " UTC")
    row("source", f"{manifest.source.uri} ({manifest.source.fingerprint})")
    row("target", manifest.target)
    row("task", manifest.task_decision or feature_set.task)
    classes = manifest.classes
    if classes is not None:
        shown = ", ".join(str(c) for c in classes[:20]) + (", ..." if len(classes) > 20 else "")
        row("classes", f"{len(classes)}: {shown}")
    if manifest.target_statistics is not None:
        target = manifest.target_statistics
        row("target mean/std", f"{_format(target.mean)} / {_format(target.std)} (training split)")
    rows, split = manifest.rows, manifest.split
    row(
        "rows",
        f"train {rows['train']} / valid {rows['valid']} / test {rows['test']} "
        f"(valid {split.valid}, test {split.test}, seed {split.seed}"
        + (", stratified)" if split.stratified else ")"),
    )
    if manifest.quarantined:
        row(
            "quarantined",
            _quarantine_said(manifest.quarantined) + f" ({feature_set.path / 'quarantine.parquet'})",
        )
    for encoder in manifest.encoders or []:
        row("encoding", _encoding_said(encoder))
    for transform in manifest.transforms:
        row("transform", f"{transform['kind']} on {len(transform['columns'])} columns (fitted on train)")
    columns = _justified_table(
        "feature columns (statistics of the training split, before transforms)",
        ["column", "type", "mean", "std", "min", "max"],
        left={"column", "type"},
    )
    for name in feature_set.feature_columns:
        stats = manifest.statistics.get(name)
        columns.add_row(
            Text(name),
            Text(manifest.raw_schema.get(name, "")),
            *(_format(getattr(stats, k) if stats is not None else "") for k in ("mean", "std", "min", "max")),
        )
    return Group(about, Text(""), columns)
