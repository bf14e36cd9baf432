"""The ``raylens`` command line.

raylens run examples/digits.yaml        # prepare → features → tune → train → evaluate → register
raylens train examples/digits.yaml      # train the spec as written (no sweep)
raylens tune examples/digits.yaml       # the sweep alone
raylens features build|list|show SPEC   # the feature pipeline and the offline store
raylens ui                              # the MLflow UI on the run store, on 127.0.0.1
raylens submit SPEC --address http://HEAD:8265 --runs-dir /mnt/shared/runs --tracking-uri URL
raylens jobs list|status|logs|stop --address http://HEAD:8265
raylens pipeline|serve|promote|rollback|ct ...  # delivery (raylens/cluster/delivery_cli.py)
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from raylens.errors import UserError
from raylens.interrupts import Interrupted

app = typer.Typer(
    help="Train, tune and register PyTorch models on Ray from one experiment spec, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
features_app = typer.Typer(
    help="Build and inspect versioned feature sets in the offline store.", no_args_is_help=True
)
app.add_typer(features_app, name="features")


def _print_version(asked: bool) -> None:
    if asked:
        from raylens import __version__

        print(f"raylens {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print raylens' version and exit."
        ),
    ] = False,
) -> None:
    """Train, tune, register, release and serve PyTorch and scikit-learn models on Ray from one
    experiment spec, tracked in MLflow."""


console = Console()
errors = Console(stderr=True)

SpecArg = Annotated[Path, typer.Argument(metavar="SPEC", help="Experiment spec (YAML).", show_default=False)]
RunsDir = Annotated[
    str | None,
    typer.Option(
        "--runs-dir",
        metavar="PATH|URI",
        help="Run folder: feature store, checkpoints, MLflow db. A path, or object storage "
        "(s3://bucket/folder, gs://bucket/folder; runs then tracked on an MLflow server).  "
        "[default: ./raylens-runs]",
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's and MLflow's own logs.")]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue this spec's latest run where it stopped (same MLflow runs, from its checkpoints); "
        "refused if the spec or data changed since, or another process is running it.",
    ),
]
Address = Annotated[
    str | None,
    typer.Option(
        "--address", help="Ray cluster to connect to (ray://host:10001 or 'auto'); default: embedded."
    ),
]

Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override one key of the spec, validated like the file: --set train.epochs=5 "
        "--set model.params.hidden=[64,32]. Repeatable.",
        show_default=False,
    ),
]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Check the spec, the data, the model and the sweep's metric, print what would run, "
        "and stop: nothing is started or written.",
    ),
]

F = TypeVar("F", bound=Callable[..., Any])


def _as_interrupted(exc: KeyboardInterrupt) -> Interrupted:
    """A plain KeyboardInterrupt (Ctrl-C before raylens's handlers are in place) is a SIGINT."""
    return exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)


def user_errors(command: F) -> F:
    """Mistakes the user can fix print one clear message and exit 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            # soft_wrap: the terminal wraps long lines, so a path or command in the message is
            # never broken by an inserted newline and can be copied whole.
            errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            stop = _as_interrupted(exc)
            errors.print(f"[yellow]interrupted[/] by {signal.Signals(stop.signum).name}")
            raise typer.Exit(stop.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _run(
    spec: Path,
    runs_dir: str | None,
    verbose: bool,
    command: str,
    overrides: list[str] | None,
    dry_run: bool,
    best_from: str | None = None,
    **kwargs: Any,
) -> None:
    from raylens.cluster.interrupt import stop_on_signals
    from raylens.cluster.runtime import quiet_cli_process

    quiet_cli_process(verbose)  # before MLflow and Ray are imported: they read their log levels then
    from raylens.cluster.experiment import Experiment

    with stop_on_signals():
        # Light: a mistake in the spec is answered before torch, Ray or MLflow are imported.
        experiment = Experiment.from_yaml(spec, runs_dir, overrides or (), best_from)
        if dry_run:
            _check(experiment, command, kwargs.get("address"))
            return
        from raylens.cluster.console import RichProgress, summary_table

        tune = experiment.spec.tune
        progress = RichProgress(console, tune.metric, tune.mode) if tune else RichProgress(console)
        try:
            summary = experiment.run(progress=progress, verbose=verbose, **kwargs)
        except KeyboardInterrupt as exc:
            stop = _as_interrupted(exc)
            # Quoted as a shell takes it: a storage URI's options hold '&' and '?'.
            again = shlex.join(
                ["raylens", command, str(spec)]
                + (["--best-from", best_from] if best_from else [])
                + [part for item in overrides or () for part in ("--set", item)]
                + (["--runs-dir", runs_dir] if runs_dir else [])
                + ["--resume"]
            )
            errors.print(
                f"[yellow]interrupted[/] by {signal.Signals(stop.signum).name}: this run's open MLflow "
                f"runs are marked KILLED and no model was registered; its checkpoints are kept. "
                f"Continue it with: [bold]{escape(again)}[/]",
                highlight=False,
            )
            raise typer.Exit(stop.exit_code) from None
    if summary.leaderboard is not None:
        from raylens.cluster.console import leaderboard_table

        console.print(leaderboard_table(summary.leaderboard))
    console.print(summary_table(summary, command))
    ui = shlex.join(["raylens", "ui"] + (["--runs-dir", runs_dir] if runs_dir else []))
    if summary.tracking_uri.startswith("sqlite:"):
        console.print(f"Open the runs with [bold]{escape(ui)}[/] (MLflow UI on http://127.0.0.1:5000)")


def _check(experiment: Any, command: str, address: str | None) -> None:
    """Every check ``command`` would make before starting, all problems at once; then what it would do."""
    from raylens.cluster.console import dry_run_table, rows_on

    with console.status("checking the spec, data and model") as status:
        report = experiment.validate(
            tune=command != "train",
            address=address,
            rows_done=rows_on(status, "checking the spec, data and model"),
        )
    report.raise_problems()
    console.print(dry_run_table(experiment, report, command))


@app.command(short_help="prepare → features → tune → train → evaluate → register")
@user_errors
def run(
    spec: SpecArg,
    resume: Resume = False,
    runs_dir: RunsDir = None,
    verbose: Verbose = False,
    address: Address = None,
    overrides: Overrides = None,
    dry_run: DryRun = False,
) -> None:
    """The whole phase: prepare data, build features, tune (if the spec has a tune section),
    train the best configuration, evaluate on the test split and register the model."""
    _run(spec, runs_dir, verbose, "run", overrides, dry_run, resume=resume, address=address)


@app.command(short_help="Train the spec (or a sweep's best), evaluate, register")
@user_errors
def train(
    spec: SpecArg,
    resume: Resume = False,
    runs_dir: RunsDir = None,
    verbose: Verbose = False,
    address: Address = None,
    overrides: Overrides = None,
    dry_run: DryRun = False,
    best_from: Annotated[
        str | None,
        typer.Option(
            "--best-from",
            metavar="RUN_ID",
            help="Train with the best configuration of this sweep (the 'sweep run id' that "
            "`raylens tune` or `raylens run` printed); --set still applies on top.",
        ),
    ] = None,
) -> None:
    """Train the spec as written (its tune section is ignored), evaluate and register.
    With --best-from, train a sweep's best configuration; or train the best.yaml a sweep wrote."""
    _run(
        spec,
        runs_dir,
        verbose,
        "train",
        overrides,
        dry_run,
        resume=resume,
        address=address,
        tune=False,
        best_from=best_from,
    )


@app.command(short_help="The hyperparameter sweep alone")
@user_errors
def tune(
    spec: SpecArg,
    resume: Resume = False,
    runs_dir: RunsDir = None,
    verbose: Verbose = False,
    address: Address = None,
    overrides: Overrides = None,
    dry_run: DryRun = False,
) -> None:
    """Run the spec's hyperparameter sweep alone and report the best configuration."""
    _run(spec, runs_dir, verbose, "tune", overrides, dry_run, resume=resume, address=address, train=False)


JobsAddress = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="RAY_API_SERVER_ADDRESS",
        help="The cluster's Jobs API: its head node's dashboard URL, http://HEAD:8265 "
        "(env RAY_API_SERVER_ADDRESS, as `ray job` reads it).",
        show_default=False,
    ),
]
Insecure = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Call a cluster off this machine without a Ray auth token (not recommended: such a "
        "cluster runs anyone's code).",
    ),
]


@app.command(short_help="Run the spec on a Ray cluster through the Ray Jobs API")
@user_errors
def submit(
    spec: SpecArg,
    address: JobsAddress,
    runs_dir: Annotated[
        str | None,
        typer.Option(
            "--runs-dir",
            help="Run folder on the cluster: one every node mounts (e.g. /mnt/shared/raylens-runs), "
            "or object storage the nodes reach with their own credentials (s3://bucket/folder).",
            show_default=False,
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking server the cluster reaches (default: MLFLOW_TRACKING_URI); "
            "sent in the job's environment, never logged.",
            show_default=False,
        ),
    ] = None,
    overrides: Overrides = None,
    command: Annotated[str, typer.Option("--command", help="What the job runs: run, train or tune.")] = "run",
    python: Annotated[
        str,
        typer.Option(
            "--python",
            help="The cluster's Python, with Ray, torch and MLflow (the training image's `python`).",
        ),
    ] = "python",
    max_upload_mib: Annotated[
        float, typer.Option("--max-upload-mib", help="Refuse a working directory larger than this.")
    ] = 100,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Print the job id and return; do not stream its log.")
    ] = False,
    insecure: Insecure = False,
    verbose: Verbose = False,
) -> None:
    """Run the spec on a Ray cluster: the spec's folder is the job's working directory, this
    raylens goes with it, and the cluster runs `raylens run` with its own Python. The log streams
    here; Ctrl-C detaches (the job goes on) and prints how to follow it again."""
    from raylens.cluster.experiment import Experiment
    from raylens.cluster.runtime import JobsEndpoint, quiet_cli_process
    from raylens.cluster.submit import JobsClient, plan_submission, reattach_hint

    quiet_cli_process(verbose)

    if command not in ("run", "train", "tune"):
        raise UserError(f"--command {command}: give run, train or tune")
    # The spec and overrides are checked here, before anything is uploaded.
    experiment = Experiment.from_yaml(spec, None, overrides or ())
    submission = plan_submission(
        spec,
        spec_name=experiment.spec.name,
        data_source=experiment.spec.data.source,
        runs_dir=runs_dir,
        tracking_uri=tracking_uri,
        overrides=overrides or (),
        python=python,
        command=command,
        max_upload_mib=max_upload_mib,
    )
    client = JobsClient(JobsEndpoint.resolve(address, insecure=insecure))
    job_id = client.submit(submission)
    console.print(
        f"submitted job [bold]{escape(job_id)}[/] to {escape(address)} "
        f"({submission.upload_bytes / 2**20:.1f} MiB from {escape(str(submission.working_dir))})",
        highlight=False,
        soft_wrap=True,  # one line, whatever the terminal's width: the id is copied from it
    )
    if no_wait:
        console.print(escape(reattach_hint(job_id, address)), highlight=False, soft_wrap=True)
        return
    _follow(client, job_id, address)


def _follow(client: Any, job_id: str, address: str) -> None:
    """Stream a job's log; exit 0 if it succeeded, 1 if not. Ctrl-C detaches."""
    from raylens.cluster.submit import reattach_hint

    try:
        info = client.follow(job_id, write=_write_out)
    except KeyboardInterrupt:
        errors.print(
            f"[yellow]detached[/]: job {escape(job_id)} goes on; {escape(reattach_hint(job_id, address))}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(0) from None
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    if status == "SUCCEEDED":
        console.print(f"job {escape(job_id)} succeeded", highlight=False)
        return
    reason = f": {info.message}" if info.message else ""
    errors.print(
        f"[bold red]job {escape(job_id)} {status.lower()}[/]{escape(reason)}; its log stays on the "
        f"cluster: raylens jobs logs {escape(job_id)} --address {escape(address)}",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(1)


def _write_out(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


jobs_app = typer.Typer(
    help="Jobs submitted to a Ray cluster: list, status, logs, stop.", no_args_is_help=True
)
app.add_typer(jobs_app, name="jobs")
JobId = Annotated[str, typer.Argument(metavar="JOB_ID", help="The id `raylens submit` printed.")]


def _jobs_client(address: str, insecure: bool) -> Any:
    from raylens.cluster.runtime import JobsEndpoint, quiet_cli_process
    from raylens.cluster.submit import JobsClient

    quiet_cli_process(verbose=False)

    return JobsClient(JobsEndpoint.resolve(address, insecure=insecure))


@jobs_app.command("list")
@user_errors
def jobs_list(address: JobsAddress, insecure: Insecure = False) -> None:
    """The cluster's jobs, newest first."""
    from rich.table import Table

    table = Table(box=None)
    for column in ("job", "status", "started"):  # whole, however narrow the terminal
        table.add_column(column, no_wrap=True, min_width=len(column))
    table.add_column("entrypoint", overflow="fold")
    found = sorted(_jobs_client(address, insecure).jobs(), key=lambda j: j.start_time or 0, reverse=True)
    for job in found:
        started = datetime_of(job.start_time)
        table.add_row(job.submission_id or job.job_id or "", str(job.status.value), started, job.entrypoint)
    console.print(table if found else "no jobs")


def datetime_of(millis: int | None) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(millis / 1000).strftime("%Y-%m-%d %H:%M:%S") if millis else ""


@jobs_app.command("status")
@user_errors
def jobs_status(job_id: JobId, address: JobsAddress, insecure: Insecure = False) -> None:
    """A job's status and, when it ended, why."""
    info = _jobs_client(address, insecure).status(job_id)
    message = f": {info.message}" if info.message else ""
    console.print(f"{escape(job_id)} {info.status.value}{escape(message)}", highlight=False)


@jobs_app.command("logs")
@user_errors
def jobs_logs(
    job_id: JobId,
    address: JobsAddress,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
    insecure: Insecure = False,
) -> None:
    """A job's log (what `raylens submit` streamed); with --follow, streamed until it ends."""
    client = _jobs_client(address, insecure)
    if follow:
        _follow(client, job_id, address)
    else:
        _write_out(client.logs(job_id))


@jobs_app.command("stop")
@user_errors
def jobs_stop(job_id: JobId, address: JobsAddress, insecure: Insecure = False) -> None:
    """Stop a running job (its checkpoints stay for a resume)."""
    stopped = _jobs_client(address, insecure).stop(job_id)
    console.print(f"{escape(job_id)}: {'stopping' if stopped else 'not running'}", highlight=False)


@app.command(short_help="Check a spec, its data and model; start nothing")
@user_errors
def validate(
    spec: SpecArg,
    overrides: Overrides = None,
    runs_dir: RunsDir = None,
    address: Address = None,
) -> None:
    """Check a spec without running it: its keys, the model's parameters and each configuration
    the sweep may sample, the data (read and prepared in memory), the model on a real batch, the
    sweep's metric, the tracking store and --address. Every problem is listed at once; nothing is
    started or written. (The same as `raylens run SPEC --dry-run`.)"""
    from raylens.cluster.experiment import Experiment

    _check(Experiment.from_yaml(spec, runs_dir, overrides or ()), "run", address)


TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else the run folder's SQLite db.",
    ),
]


@app.command(short_help="Score CSV/Parquet files with a registered model")
@user_errors
def predict(
    model_uri: Annotated[
        str,
        typer.Argument(
            metavar="MODEL_URI",
            help="The model: models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/model.",
            show_default=False,
        ),
    ],
    data: Annotated[
        Path,
        typer.Argument(
            metavar="DATA", help="A .csv or .parquet file, or a folder of them, with the raw feature columns."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output file, .csv or .parquet.", show_default=False)
    ],
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep", metavar="COLUMN", help="Copy this input column (an id) to the output. Repeatable."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    runs_dir: RunsDir = None,
    tracking_uri: TrackingUri = None,
    batch_rows: Annotated[int, typer.Option("--batch-rows", min=1, help="Rows scored at once.")] = 65_536,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="1: score in this process; more: on that many Ray Data actors. "
            "Default: Ray Data with one actor per core for inputs of 1 GiB or more.",
            show_default=False,
        ),
    ] = None,
    address: Address = None,
) -> None:
    """Score a file or folder of rows with a registered model, in batches, into one output file:
    the --keep columns, `prediction`, and for a classifier one `probability_<class>` column per
    class. The input is checked as the served model checks it; a failure writes nothing. A model
    of a feature set with entity ids also scores rows holding the ids alone: their features come
    from the online store the RAYLENS_ONLINE_STORE variable names (`raylens features materialize`)."""
    from rich.progress import Progress as Bar

    from raylens.cluster.predict import predict_files
    from raylens.cluster.runtime import quiet_cli_process
    from raylens.cluster.workspace import Workspace

    quiet_cli_process(verbose=False)
    uri = tracking_uri or Workspace.at(runs_dir).tracking_uri("default")
    with Bar(console=console, transient=True) as bar:
        task = bar.add_task("predicting", total=None)
        done = predict_files(
            model_uri,
            data,
            out,
            tracking_uri=uri,
            keep=keep or (),
            overwrite=overwrite,
            batch_rows=batch_rows,
            workers=workers,
            address=address,
            on_batch=lambda rows: bar.advance(task, rows),
        )
    console.print(f"{done.rows} rows → {escape(str(done.out))} (columns: {escape(', '.join(done.columns))})")


@app.command(short_help="The leaderboard of a sweep: trials ranked, with their costs")
@user_errors
def leaderboard(
    run_id: Annotated[
        str,
        typer.Argument(
            metavar="RUN_ID",
            help="The sweep run id that `raylens tune` or `raylens run` printed.",
            show_default=False,
        ),
    ],
    runs_dir: RunsDir = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Print a finished sweep's leaderboard: its completed trials ranked on the sweep's metric,
    each with its training time, one row's prediction latency (p50, p95), model size and peak
    memory, the Pareto front of metric against latency, each candidate's top permutation
    importances, and which trials meet tune.constraints."""
    from raylens.cluster.console import leaderboard_table
    from raylens.cluster.invocation import leaderboard_of_run
    from raylens.cluster.runtime import quiet_cli_process
    from raylens.cluster.workspace import Workspace

    quiet_cli_process(verbose=False)
    uri = tracking_uri or Workspace.at(runs_dir).tracking_uri("default")
    console.print(leaderboard_table(leaderboard_of_run(uri, run_id), f"leaderboard of run {run_id}"))


@app.command("debug", short_help="A run's debugger findings and timeline, or a sweep's rules fired")
@user_errors
def debug_command(
    run_id: Annotated[
        str,
        typer.Argument(
            metavar="RUN_ID",
            help="A training run's or trial's MLflow run id; with --sweep, a sweep's run id.",
            show_default=False,
        ),
    ],
    sweep: Annotated[
        bool, typer.Option("--sweep", help="Summarize the rules fired across the sweep's trials.")
    ] = False,
    html: Annotated[
        bool,
        typer.Option(
            "--html",
            help="Also download the HTML report (plots included), print its path, and open it in the "
            "web browser where there is a desktop to show it.",
        ),
    ] = False,
    runs_dir: RunsDir = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Print what the debugger found in a finished run: each rule that fired (step, rank, evidence,
    suggested fix), then the timeline of its captures (time per batch, the share of data wait,
    forward, backward and optimizer, memory). With --sweep, the rules fired in each trial."""
    from raylens.cluster.console import debug_tables, sweep_debug_table
    from raylens.cluster.invocation import debug_of_run, debug_of_sweep
    from raylens.cluster.runtime import quiet_cli_process
    from raylens.cluster.workspace import Workspace

    quiet_cli_process(verbose=False)
    uri = tracking_uri or Workspace.at(runs_dir).tracking_uri("default")
    if sweep:
        console.print(sweep_debug_table(debug_of_sweep(uri, run_id), f"debugger findings of sweep {run_id}"))
        return
    record = debug_of_run(uri, run_id)
    console.print(debug_tables(record))
    if html:
        if record.report_uri is None:
            raise UserError(f"run '{run_id}' holds no debugger report (train.debug was off)")
        import mlflow

        local = mlflow.artifacts.download_artifacts(record.report_uri, dst_path=tempfile.mkdtemp())
        console.print(Text(f"report: {local}"))
        _open_in_browser(Path(local))


def _open_in_browser(page: Path) -> None:
    """Open ``page`` in the desktop's browser; on a machine without a desktop (a server, a CI
    runner, SSH without X forwarding), leave it: the printed path is the way to it."""
    import webbrowser

    desktop = (
        sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )
    if desktop:
        webbrowser.open(page.as_uri())


@app.command("spec", short_help="Every spec key with its type, default and meaning")
def spec_command() -> None:
    """Print the spec reference: every key, its type, default and meaning, and the metric names."""
    from raylens.cluster.spec import spec_reference

    print(spec_reference(), end="")


@features_app.command("build")
@user_errors
def features_build(spec: SpecArg, runs_dir: RunsDir = None, overrides: Overrides = None) -> None:
    """Run the data prepare and feature pipelines and store the feature set (reused if unchanged)."""
    from raylens.cluster.console import RichProgress
    from raylens.cluster.experiment import Experiment

    progress = RichProgress(console)
    try:
        feature_set = Experiment.from_yaml(spec, runs_dir, overrides or ()).build_features(progress.data_rows)
    finally:
        progress.data_finished()
    progress.feature_set(feature_set)
    console.print(f"  stored at {escape(str(feature_set.path))}", highlight=False)


@features_app.command("list")
@user_errors
def features_list(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="Feature set name.")] = None,
    runs_dir: RunsDir = None,
) -> None:
    """List the stored feature-set versions."""
    from rich.table import Table
    from rich.text import Text

    from raylens.cluster.workspace import Workspace
    from raylens.features import list_feature_sets

    found = list_feature_sets(Workspace.at(runs_dir).feature_store, name)
    if not found:
        console.print("no feature sets stored yet: run `raylens features build SPEC`")
        return
    table = Table()
    # Names and ids are copied from here: a narrow terminal wraps them, never cuts them.
    table.add_column("name", overflow="fold")
    table.add_column("version", no_wrap=True, min_width=16)
    for column in ("created", "task", "train/valid/test", "source"):
        table.add_column(column, overflow="fold")
    for fs in found:
        rows = fs.manifest.rows
        created = fs.manifest.created_at[:16].replace("T", " ")
        cells = (fs.name, fs.version, created, fs.task, f"{rows['train']}/{rows['valid']}/{rows['test']}")
        table.add_row(*(Text(cell) for cell in (*cells, fs.manifest.source.uri)))
    console.print(table)


@features_app.command("show")
@user_errors
def features_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Feature set name.")],
    version: Annotated[
        str | None, typer.Argument(metavar="VERSION", help="Version (default: the newest).")
    ] = None,
    runs_dir: RunsDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest itself, as JSON.")] = False,
) -> None:
    """Show a feature set: source, task, split, transforms, and each feature column's type and
    statistics. --json prints the whole manifest."""
    from raylens.cluster.workspace import Workspace
    from raylens.features import list_feature_sets, open_feature_set

    root = Workspace.at(runs_dir).feature_store
    if version is None:
        versions = list_feature_sets(root, name)
        if not versions:
            raise UserError(f"no feature set named '{name}'; see `raylens features list`")
        feature_set = versions[-1]
    else:
        feature_set = open_feature_set(root, name, version)
    if as_json:
        print(feature_set.manifest.to_json())
        return
    from raylens.cluster.console import feature_set_view

    console.print(feature_set_view(feature_set))


@features_app.command("diff")
@user_errors
def features_diff(
    before: Annotated[
        str,
        typer.Argument(metavar="A", help="NAME@VERSION, or NAME for its newest version.", show_default=False),
    ],
    after: Annotated[
        str,
        typer.Argument(
            metavar="B",
            help="NAME@VERSION, NAME, or a VERSION of A's feature set.",
            show_default=False,
        ),
    ],
    runs_dir: RunsDir = None,
) -> None:
    """What changed from feature set A to B: source columns added, removed or retyped, the task,
    classes, feature columns and transforms, and each feature column's drift on the training
    split (PSI over A's deciles: under 0.1 stable, above 0.25 major; and the Kolmogorov-Smirnov
    statistic), most drifted first."""
    from raylens.cluster.console import diff_view
    from raylens.cluster.workspace import Workspace
    from raylens.features.drift import diff_feature_sets

    root = Workspace.at(runs_dir).feature_store
    first = _feature_set_at(root, before)
    second = _feature_set_at(
        root, after if "@" in after or _is_feature_set(root, after) else f"{first.name}@{after}"
    )
    console.print(diff_view(diff_feature_sets(first, second)))


@features_app.command("materialize")
@user_errors
def features_materialize(
    feature_set: Annotated[
        str,
        typer.Argument(
            metavar="NAME", help="NAME@VERSION, or NAME for its newest version.", show_default=False
        ),
    ],
    runs_dir: RunsDir = None,
    online_store: Annotated[
        Path | None,
        typer.Option(help="The online store's SQLite file; default: online.db in the run folder."),
    ] = None,
) -> None:
    """Write the latest feature vector of each entity of a stored version into the online store
    (SQLite), replacing what it held for that feature set at once. The version must keep entity
    ids: name the id column in the spec's data.entity."""
    from raylens.cluster.workspace import Workspace
    from raylens.features.online import SqliteOnlineStore, materialize

    workspace = Workspace.at(runs_dir)
    chosen = _feature_set_at(workspace.feature_store, feature_set)
    store = SqliteOnlineStore(online_store or workspace.online_store)
    try:
        count = materialize(chosen, store)
    finally:
        store.close()
    console.print(Text(f"materialized {count} entities of {chosen.name}@{chosen.version} into {store.path}"))


def _is_feature_set(root: Any, name: str) -> bool:
    from raylens.features import list_feature_sets

    return bool(list_feature_sets(root, name))


def _feature_set_at(root: Any, reference: str) -> Any:
    """The feature set ``NAME@VERSION``, or ``NAME``'s newest version."""
    from raylens.features import list_feature_sets, open_feature_set

    name, _, version = reference.partition("@")
    if version:
        return open_feature_set(root, name, version)
    versions = list_feature_sets(root, name)
    if not versions:
        raise UserError(f"no feature set named '{name}'; see `raylens features list`")
    return versions[-1]


@app.command(short_help="The MLflow UI on 127.0.0.1")
@user_errors
def ui(
    runs_dir: RunsDir = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    uri: Annotated[
        str | None, typer.Option(help="Tracking URI; default: the run folder's SQLite db.")
    ] = None,
) -> None:
    """Start the MLflow UI on 127.0.0.1 for the run store."""
    from raylens.cluster.workspace import Workspace

    workspace = Workspace.at(runs_dir)
    backend = uri or workspace.default_tracking_uri
    if backend is None:
        raise UserError(
            f"--runs-dir {workspace.root} is object storage: its runs are on the MLflow server they were "
            "tracked on; open that server's UI, or serve it here with --uri http://HOST:5000"
        )
    if uri is None and not (workspace.root / "mlflow.db").exists():
        raise UserError(f"no runs in {workspace.root} yet: run `raylens run SPEC` first, or pass --runs-dir")
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    # One worker process: a UI on loopback serves one person, and each worker imports MLflow anew
    # (the default four take ~10 s more to start on a small machine).
    command = [
        mlflow_cli,
        "ui",
        "--backend-store-uri",
        backend,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    console.print(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C stops it)")
    # The server and its workers get a process group of their own, stopped as one when this
    # process is stopped (Ctrl-C, SIGTERM): nothing is left running or listening on the port.
    from raylens.cluster.interrupt import stop_on_signals

    server = subprocess.Popen(command, start_new_session=True)
    with stop_on_signals(), contextlib.suppress(KeyboardInterrupt):  # how the UI is meant to stop
        try:
            server.wait()
        finally:
            stop_process_group(server)


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM to ``process``'s group, SIGKILL to what is still there after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(process.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# The delivery commands register themselves on ``app`` (they use the options defined above).
from raylens.cluster import delivery_cli  # noqa: E402, F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
