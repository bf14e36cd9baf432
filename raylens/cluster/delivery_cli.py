"""The delivery commands of the ``raylens`` command line: the release pipeline, serving, alias
moves and continuous training.

raylens pipeline SPEC [--approve] [--resume]   # train → gate → staging → smoke → production
raylens serve NAME@ALIAS                       # a Ray Serve endpoint on 127.0.0.1
raylens promote NAME VERSION --reason TEXT     # move an alias (production by default)
raylens rollback NAME --reason TEXT            # back to the version before
raylens ct check SPEC                          # retrain when the data drifted
"""

from __future__ import annotations

import shlex
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from raylens.cluster.cli import (
    Address,
    Overrides,
    RunsDir,
    SpecArg,
    TrackingUri,
    Verbose,
    _as_interrupted,
    app,
    console,
    errors,
    user_errors,
)

ct_app = typer.Typer(help="Continuous training: retrain when the data calls for it.", no_args_is_help=True)
app.add_typer(ct_app, name="ct")

Approve = Annotated[
    bool,
    typer.Option(
        "--approve",
        help="Release to production a version that passes (release.approval: manual needs it); with "
        "--resume, the version a pipeline left at staging.",
    ),
]
PipelineResume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue this spec's latest unfinished pipeline from the step that failed."
    ),
]
ModelName = Annotated[
    str, typer.Argument(metavar="MODEL", help="The registered model's name.", show_default=False)
]
Reason = Annotated[
    str,
    typer.Option("--reason", help="Why the alias moves; kept in the model's history.", show_default=False),
]
Alias = Annotated[str, typer.Option("--alias", help="The alias to move.")]


def _tracking(runs_dir: str | None, tracking_uri: str | None, configured: str = "default") -> str:
    """The registry to read: --tracking-uri, else the spec's or the run folder's store, which
    must exist (opening a SQLite file creates it: a mistyped --runs-dir would leave one)."""
    from raylens.cluster.workspace import Workspace
    from raylens.errors import UserError

    if tracking_uri:
        return tracking_uri
    workspace = Workspace.at(runs_dir)
    uri = workspace.tracking_uri(configured)
    if workspace.holds_no_store(uri):
        raise UserError(
            f"no runs in {workspace.root}: no registered model to read there; pass the --runs-dir "
            "(or --tracking-uri) its models were registered in"
        )
    return uri


def _client(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(uri, registry_uri=uri)


@app.command(short_help="train → quality gate → staging → smoke test on Ray Serve → production")
@user_errors
def pipeline(
    spec: SpecArg,
    approve: Approve = False,
    resume: PipelineResume = False,
    runs_dir: RunsDir = None,
    verbose: Verbose = False,
    address: Address = None,
    overrides: Overrides = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the spec, data, model and release settings, print what would run and what "
            "the gate would compare with; nothing is started or written.",
        ),
    ] = False,
) -> None:
    """Train the spec and release the model: register a new version, judge it against the
    production version on the same test rows (paired bootstrap, release section), alias it
    `staging`, deploy it on Ray Serve and check its HTTP answers equal its offline predictions,
    then alias it `production` (automatically, or with --approve for release.approval: manual).
    Every step is recorded in one MLflow run. Exit 1 when the gate or the smoke test stops the
    release: production stays where it was."""
    from raylens.cluster.runtime import quiet_cli_process

    quiet_cli_process(verbose)
    from raylens.cluster.console import RichProgress
    from raylens.cluster.experiment import Experiment
    from raylens.cluster.interrupt import stop_on_signals
    from raylens.cluster.pipeline import REJECTED, Pipeline, ReleaseStopped

    with stop_on_signals():
        experiment = Experiment.from_yaml(spec, runs_dir, overrides or ())
        tune = experiment.spec.tune
        progress = RichProgress(console, tune.metric, tune.mode) if tune else RichProgress(console)
        runner = Pipeline(experiment, approve=approve, verbose=verbose, address=address, progress=progress)
        if dry_run:
            _pipeline_dry_run(runner)
            return
        try:
            result = runner.run(resume=resume)
        except ReleaseStopped as stopped:
            errors.print(
                f"[bold red]release stopped:[/] {escape(str(stopped))}", highlight=False, soft_wrap=True
            )
            errors.print(f"Resume from this step with: {escape(_again(spec, runs_dir, overrides))}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            stop = _as_interrupted(exc)
            errors.print(
                f"[yellow]interrupted[/] by {signal.Signals(stop.signum).name}: the pipeline run is marked "
                f"KILLED and nothing further was released. Continue it with: "
                f"[bold]{escape(_again(spec, runs_dir, overrides))}[/]",
                highlight=False,
            )
            raise typer.Exit(stop.exit_code) from None
    _print_pipeline(result)
    if result.state == REJECTED:
        raise typer.Exit(1)


def _pipeline_dry_run(runner: Any) -> None:
    """What ``raylens pipeline`` would do: the run's checks and plan, then the release's."""
    from raylens.cluster.console import dry_run_table, rows_on
    from raylens.cluster.release_config import check_embedded_capacity

    experiment = runner.experiment
    spec = experiment.spec
    if runner.address is None:
        check_embedded_capacity(spec.serve)
    with console.status("checking the spec, data and model") as status:
        report = experiment.validate(
            tune=spec.tune is not None,
            address=runner.address,
            rows_done=rows_on(status, "checking the spec, data and model"),
        )
    report.raise_problems()
    table = dry_run_table(experiment, report, "pipeline")
    release = spec.release
    gate = (
        f"{release.metric or 'accuracy / rmse'} must beat production by more than {release.margin:g} "
        f"({release.confidence:.0%} paired bootstrap, {release.resamples} resamples)"
    )
    bounds = [
        f"{name} {value:g}"
        for name, value in (
            ("threshold", release.threshold),
            ("max latency ms", release.max_latency_ms),
            ("max size MB", release.max_size_mb),
        )
        if value is not None
    ]
    table.add_row("gate", Text(gate + (f"; {', '.join(bounds)}" if bounds else "")))
    table.add_row("production now", Text(_production_now(experiment, runner.name)))
    table.add_row("release", Text("automatic" if release.approval == "auto" else "manual: waits at staging"))
    console.print(table)


def _production_now(experiment: Any, name: str) -> str:
    """The version at production, read without creating a store where there is none."""
    from raylens.cluster.release import production_version

    uri = experiment.tracking_uri
    version = None if experiment.workspace.holds_no_store(uri) else production_version(_client(uri), name)
    return f"version {version}" if version else "none (a first release is judged on the thresholds alone)"


def _again(spec: Path, runs_dir: str | None, overrides: list[str] | None) -> str:
    """The command that resumes this pipeline, quoted as a shell takes it."""
    return shlex.join(
        ["raylens", "pipeline", str(spec)]
        + [part for item in overrides or () for part in ("--set", item)]
        + (["--runs-dir", runs_dir] if runs_dir else [])
        + ["--resume"]
    )


def _print_pipeline(result: Any) -> None:
    table = Table(title=f"pipeline run {result.run_id}", show_header=False)
    table.add_row("model", f"{result.model} version {result.version}")
    table.add_row("outcome", result.state.replace("_", " "))
    table.add_row("production", f"version {result.production}" if result.production else "none")
    if result.verdict is not None:
        for check in result.verdict.checks:
            table.add_row(f"gate: {check.name}", ("passed: " if check.passed else "FAILED: ") + check.detail)
        for note in result.verdict.notes:
            table.add_row("gate: note", note)
    if result.smoke_rows:
        table.add_row("smoke test", f"{result.smoke_rows} test rows over HTTP equal the offline predictions")
    console.print(table)


@app.command(short_help="Serve a registered model on Ray Serve (HTTP JSON, 127.0.0.1)")
@user_errors
def serve(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="NAME@ALIAS (follows the alias as it moves) or NAME/VERSION, optionally after models:/.",
            show_default=False,
        ),
    ],
    runs_dir: RunsDir = None,
    tracking_uri: TrackingUri = None,
    spec: Annotated[
        Path | None,
        typer.Option(
            "--spec", help="Take the endpoint's settings from this spec's serve section.", show_default=False
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Interface to listen on; 0.0.0.0 exposes it. [default: 127.0.0.1]"),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="HTTP port (0: a free one). [default: 8000]"),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option("--replicas", min=1, help="Replicas (the minimum when autoscaling). [default: 1]"),
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option("--max-replicas", min=1, help="Autoscale up to this many replicas.")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option("--max-batch-size", min=1, help="Requests batched per call. [default: 64]")
    ] = None,
    max_request_rows: Annotated[
        int | None,
        typer.Option(
            "--max-request-rows", min=1, help="Rows one request may hold (more: HTTP 413). [default: 1000]"
        ),
    ] = None,
    poll_s: Annotated[
        float | None,
        typer.Option("--poll-s", min=0.1, help="How often an alias is checked for a move. [default: 5]"),
    ] = None,
    online_store: Annotated[
        Path | None,
        typer.Option(
            "--online-store", help="SQLite online store that requests holding only entity ids read."
        ),
    ] = None,
    address: Address = None,
    verbose: Verbose = False,
) -> None:
    """Deploy a registered model as a Ray Serve application and serve until Ctrl-C:
    POST /predict (or /invocations) with {"dataframe_records": [...]}, {"dataframe_split": ...}
    or {"instances": [...]}, optional "params": {"output": "probabilities"}; GET /health and
    /version. Requests are checked against the model's signature (HTTP 400/413 naming the field)
    and batched. Served by alias, the endpoint switches to the new version when the alias moves,
    without dropping a request. Settings: the spec's serve section (--spec), then the flags."""
    from raylens.cluster.runtime import quiet_cli_process

    quiet_cli_process(verbose)
    from pydantic import ValidationError

    from raylens.cluster.interrupt import stop_on_signals
    from raylens.cluster.release_config import ServeConfig
    from raylens.cluster.serving import ModelTarget
    from raylens.cluster.spec import load_spec
    from raylens.errors import UserError

    target = ModelTarget.parse(model)
    loaded = load_spec(spec) if spec is not None else None
    base = loaded.serve if loaded is not None else ServeConfig()
    flags = {
        "host": host,
        "port": port,
        "replicas": replicas,
        "max_replicas": max_replicas,
        "max_batch_size": max_batch_size,
        "max_request_rows": max_request_rows,
        "poll_s": poll_s,
    }
    try:
        config = ServeConfig.model_validate(
            {**base.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
        )
    except ValidationError as error:
        raise UserError(f"--max-replicas: {error.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    if online_store is not None and not online_store.is_file():
        raise UserError(
            f"--online-store: {online_store} does not exist; write it with `raylens features materialize`"
        )
    uri = _tracking(runs_dir, tracking_uri, loaded.tracking.uri if loaded is not None else "default")
    with stop_on_signals():
        _serve_until_stopped(target, uri, config, online_store, address, verbose)


def _serve_until_stopped(
    target: Any, uri: str, config: Any, online_store: Path | None, address: str | None, verbose: bool
) -> None:
    from ray import serve as ray_serve

    from raylens.cluster.release_config import check_embedded_capacity
    from raylens.cluster.runtime import RuntimeSettings, start_ray, stop_ray
    from raylens.cluster.serving import resolve_version, start_endpoint

    resolve_version(_client(uri), target)  # an unknown model or alias: said before Ray starts
    if address is None:
        check_embedded_capacity(config)
        if config.port:
            _check_port_free(config.host, config.port)
    runtime = start_ray(RuntimeSettings.build(address=address, verbose=verbose))
    try:
        with console.status(f"deploying {target} on Ray Serve"):
            endpoint = start_endpoint(
                target, uri, config, online_store=str(online_store.resolve()) if online_store else None
            )
        console.print(
            f"Serving [bold]{escape(str(target))}[/] (version {endpoint.version}) at "
            f"[bold]{endpoint.url}/predict[/]; GET {endpoint.url}/health, /version. Ctrl-C stops."
        )
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping the endpoint")
        finally:
            ray_serve.delete(endpoint.app)
    finally:
        stop_ray(runtime)


def _check_port_free(host: str, port: int) -> None:
    """An embedded Serve's proxy binds ``host:port``: taken, it would fail inside Ray with a
    traceback; said here, before Ray starts."""
    import socket

    from raylens.errors import UserError

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(
                f"--port: {host}:{port} cannot be listened on ({error.strerror}); choose another port "
                "with --port (0: a free one), or stop what holds it"
            ) from None


@app.command(short_help="Point an alias (production) at a version, with a reason")
@user_errors
def promote(
    model: ModelName,
    version: Annotated[str, typer.Argument(metavar="VERSION", help="The version to point the alias at.")],
    reason: Reason,
    alias: Alias = "production",
    runs_dir: RunsDir = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Move ALIAS of MODEL to VERSION. The move (the version before, the reason, when, who) is
    appended to the model's history (`raylens.alias.*` tags); nothing recorded is rewritten."""
    from raylens.cluster.release import move_alias

    move = move_alias(_client(_tracking(runs_dir, tracking_uri)), model, alias, version, reason)
    if move.previous == move.version:
        console.print(f"{escape(model)}@{alias} is version {move.version} already: nothing moved")
        return
    before = f" (was version {move.previous})" if move.previous else ""
    console.print(f"{escape(model)}@{alias} → version {move.version}{before}: {escape(move.reason)}")


@app.command(short_help="Point an alias back at the version it held before")
@user_errors
def rollback(
    model: ModelName,
    reason: Reason,
    alias: Alias = "production",
    runs_dir: RunsDir = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Move ALIAS of MODEL back to the version it held before the current one was promoted; a
    second rollback goes one further back. Recorded in the model's history like a promotion."""
    from raylens.cluster.release import rollback as roll_back

    move = roll_back(_client(_tracking(runs_dir, tracking_uri)), model, alias, reason)
    console.print(
        f"{escape(model)}@{alias} → version {move.version} (was version {move.previous}): "
        f"{escape(move.reason)}"
    )


@ct_app.command("check")
@user_errors
def ct_check(
    spec: SpecArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report the decision; do not run the pipeline.")
    ] = False,
    approve: Approve = False,
    runs_dir: RunsDir = None,
    verbose: Verbose = False,
    address: Address = None,
    overrides: Overrides = None,
) -> None:
    """Compare the newest version of the spec's data with the one production was trained on
    (schema, PSI and KS per feature, row growth; the spec's ct section) and, past a threshold,
    run `raylens pipeline` on it. Exit 0 when nothing was needed or the new model was released."""
    from raylens.cluster.runtime import quiet_cli_process

    quiet_cli_process(verbose)
    from raylens.cluster.ct import check_retraining
    from raylens.cluster.experiment import Experiment

    experiment = Experiment.from_yaml(spec, runs_dir, overrides or ())
    with console.status("building the newest data version and comparing it with production's"):
        decision = check_retraining(experiment)
    verdict = "retrain" if decision.retrain else "no retraining needed"
    console.print(f"[bold]{verdict}[/] (data version {decision.newest}):")
    for reason in decision.reasons:
        console.print(f"  - {escape(reason)}")
    if decision.retrain and not dry_run:
        pipeline(
            spec, approve=approve, runs_dir=runs_dir, verbose=verbose, address=address, overrides=overrides
        )
