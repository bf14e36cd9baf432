"""The Ray runtime: start an embedded local cluster, or connect to one, quietly.

Everything raylens tells Ray is one value, ``RuntimeSettings``, built here and handed to
``ray.init``: the environment of Ray's workers, log levels, the CPUs of an embedded cluster. It is
never set on the calling process, so using raylens from a notebook leaves its environment,
warning filters and signal handlers as they were. Only the CLI quiets its own process
(``quiet_cli_process``): that process is raylens's own.

Embedded Ray gets more logical CPUs than the machine has cores, so Ray Data tasks and the
drivers of Ray Train runs always find a CPU beside the training workers (a 2-CPU local cluster
running 2 training workers can hang with the machine idle).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from raylens.errors import UserError

if TYPE_CHECKING:
    from raylens.trainer import TrainConfig

MIN_EMBEDDED_CPUS = 4
SUBMITTED_JOB_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the environment of a submitted job's driver."""
TRAIN_POLL_INTERVAL_S = "0.2"
"""Ray Train's controller collects each worker's report on this poll; a report blocks until it
is collected, so the default (2 s) adds up to 2 s to every epoch."""
QUIET_LOGGERS = (
    "ray",
    "ray.train",
    "ray.tune",
    "ray.data",
    # Ray Data sets "ray.data" to DEBUG when it is first imported (after this): its modules'
    # INFO lines (a Parquet read's estimates) stay quiet by a level of their own.
    "ray.data._internal",
    "ray.serve",
    "mlflow",
    "alembic",
    "py.warnings",
    "raylens",
)
SERVE_LOGGER = "ray.serve"


class WarningsAndAbove(logging.Filter):
    """For Ray Serve's logger, which sets itself back to INFO whenever Serve is called: its
    "Started Serve", "Application is ready" lines are for --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


TUNE_CONTROLLER_LOGGER = "ray.tune.execution.tune_controller"


TUNE_LOGGER = "ray.tune.tune"


class NoTrialTraceback(logging.Filter):
    """Drops Ray Tune's "Trial task failed" error, traceback included, and its closing "Trials
    did not complete" list: the CLI's live view says which trial failed and why (the error's last
    line), a trial a debugger rule stopped is no failure, and the whole traceback is in the
    trial's MLflow run (error.txt) and, with --verbose, in the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Trial task failed for trial", "Trials did not complete"))


@dataclass(frozen=True)
class RayRuntime:
    """What ``start_ray`` did: whether this process started Ray (and so must stop it)."""

    started_here: bool
    cpus: float
    address: str | None

    @property
    def embedded(self) -> bool:
        """A cluster of this machine alone, started by this process: nothing else runs on it."""
        return self.started_here and self.address in (None, "local")


EXPERIMENT_STATE_LOGGER = "ray.tune.execution.experiment_state"


class NotAStagingRace(logging.Filter):
    """Drops Ray Tune's "Saving experiment state to storage failed" error when all that failed is
    the copy of Ray's own half-written state file (``.<uuid>-tmp-…``), renamed by the next save
    while an earlier upload was listing the folder: the upload Tune launches right after copies
    the finished file (a stop on Ctrl-C waits for it), so nothing is lost and a resume reads it.
    Any other failure to save the state is still shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, FileNotFoundError) and "-tmp-" in str(error))


@dataclass(frozen=True)
class RuntimeSettings:
    """What raylens asks of Ray for one invocation."""

    address: str | None = None
    """A running cluster (``ray://host:10001``, ``host:6379`` or ``auto``); None starts an
    embedded one beside any cluster already running on the machine."""
    num_cpus: int | None = None
    """Logical CPUs of an embedded cluster; default: twice the cores, at least 4."""
    verbose: bool = False
    code_dirs: tuple[Path, ...] = ()
    """Folders Ray's workers import user code from (the spec's folder), as the driver does."""
    worker_env: Mapping[str, str] = field(default_factory=dict)
    """Environment of every Ray worker and actor of this job (Ray Train's controller included)."""
    submitted: bool = False
    """This process is the driver of a job submitted through the Jobs API (``raylens submit``):
    the job's runtime environment, which the submitter built, already holds the working
    directory and ``worker_env`` (Ray refuses a driver that sets them again)."""

    @classmethod
    def build(
        cls,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        verbose: bool = False,
        code_dirs: Sequence[Path] = (),
    ) -> RuntimeSettings:
        paths = [str(p.resolve()) for p in code_dirs]
        if os.environ.get("PYTHONPATH"):
            paths.append(os.environ["PYTHONPATH"])
        env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_INTERVAL_S}
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        submitted = SUBMITTED_JOB_VARIABLE in os.environ
        return cls(address, num_cpus, verbose, tuple(code_dirs), env, submitted)

    @property
    def logging_level(self) -> int:
        return logging.INFO if self.verbose else logging.ERROR


def quiet_cli_process(verbose: bool) -> None:
    """The CLI's own process: Ray, MLflow and friends print a lot at INFO; users see it only
    with --verbose. Never called when raylens is used as a library."""
    level = logging.INFO if verbose else logging.ERROR
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        for tune_logger in (logging.getLogger(TUNE_CONTROLLER_LOGGER), logging.getLogger(TUNE_LOGGER)):
            if not any(isinstance(f, NoTrialTraceback) for f in tune_logger.filters):
                tune_logger.addFilter(NoTrialTraceback())
        serve_logger = logging.getLogger(SERVE_LOGGER)
        if not any(isinstance(f, WarningsAndAbove) for f in serve_logger.filters):
            serve_logger.addFilter(WarningsAndAbove())
        experiment_state = logging.getLogger(EXPERIMENT_STATE_LOGGER)
        if not any(isinstance(f, NotAStagingRace) for f in experiment_state.filters):
            experiment_state.addFilter(NotAStagingRace())
        warnings.filterwarnings("ignore")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # raylens draws its own
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def embedded_cpus() -> int:
    return max(MIN_EMBEDDED_CPUS, 2 * (os.cpu_count() or 1))


def remote_host(address: str | None) -> str | None:
    """The host of a cluster ``address`` that is not this machine; None for embedded Ray, 'auto'
    (the cluster this machine belongs to) and loopback addresses."""
    if address is None or address in ("local", "auto"):
        return None
    try:
        host = urlsplit(address if "://" in address else f"//{address}").hostname
    except ValueError:
        return None
    return host if host and not is_loopback(host) else None


def check_remote_settings(address: str | None, *, runs_dir_given: bool) -> None:
    """What a cluster off this machine needs of the run: a run folder its nodes share (they read
    the feature set and write checkpoints there)."""
    if remote_host(address) is None:
        return
    if not runs_dir_given:
        raise UserError(
            f"--address {address}: the cluster's nodes read the feature set and write checkpoints in "
            "the run folder, here ./raylens-runs on this machine, which they cannot reach; give "
            "--runs-dir on storage this machine and every node reach (a shared mount, s3://, gs://), "
            "or run it with `raylens submit`"
        )


def check_address(address: str | None, timeout_s: float = 3.0) -> None:
    """Fail in seconds, naming the address, when no Ray cluster listens there (``ray.init``
    would retry for minutes)."""
    if address is None or address == "local":
        return
    if address == "auto":
        if os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").exists():
            return
        raise UserError(
            "--address auto: no Ray cluster was started on this machine (`ray start --head`); "
            "give the cluster's address, or leave --address out to run embedded"
        )
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise UserError(
            f"--address: '{address}' is not an address; write ray://HOST:10001 (Ray Client) "
            "or HOST:6379 (the head node's GCS), or 'auto'"
        )
    refused = _unreachable(host, port, timeout_s)
    if refused:
        raise UserError(
            f"--address: no Ray cluster answers at {address} ({refused}); check the head node is up "
            "and the port is reachable, or leave --address out to run embedded"
        )


def _unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why nothing accepts a connection at ``host:port`` within ``timeout_s``; None if something does."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return str(exc)
    return None


TOKEN_SOURCES = "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"


def auth_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """The Ray auth token of this user, where Ray itself looks: ``RAY_AUTH_TOKEN``, the file
    named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` (what ``ray get-auth-token
    --generate`` writes)."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    named = environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else (home or Path.home()) / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        if named:
            raise UserError(
                f"RAY_AUTH_TOKEN_PATH names {path}, which cannot be read; point it at the "
                "cluster's token file, or set RAY_AUTH_TOKEN"
            ) from None
        return None
    return token or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class JobsEndpoint:
    """A Ray cluster's Jobs API (the dashboard's HTTP port), and the token sent with every call."""

    url: str
    token: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(
        cls,
        address: str,
        *,
        insecure: bool = False,
        environ: Mapping[str, str] | None = None,
        home: Path | None = None,
        timeout_s: float = 3.0,
    ) -> JobsEndpoint:
        """Check ``address`` (http://HEAD:8265) before any call: its form, that something
        listens there, and that a cluster off this machine is reached with a token (found by
        ``auth_token`` in ``environ`` and ``home``, this process's by default)."""
        parts = urlsplit(address)
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            host, port = None, None
        if parts.scheme not in ("http", "https") or not host:
            raise UserError(
                f"--address: '{address}' is not a Jobs API address; give the head node's dashboard "
                "URL, e.g. http://HEAD:8265 (`ray job` uses the same one)"
            )
        token = auth_token(environ, home)
        if token is None and not is_loopback(host) and not insecure:
            raise UserError(
                f"--address {address}: no Ray auth token found ({TOKEN_SOURCES}). A Ray cluster "
                "that accepts calls without one runs anyone's code (CVE-2023-48022): start it with "
                "RAY_AUTH_MODE=token and give its token here; --insecure submits without one"
            )
        port = port or (443 if parts.scheme == "https" else 80)
        refused = _unreachable(host, port, timeout_s)
        if refused:
            raise UserError(
                f"--address: nothing answers at {address} ({refused}); check the head node is up and "
                "its dashboard port (8265) is reachable, e.g. through `ray dashboard CLUSTER.yaml`"
            )
        return cls(address.rstrip("/"), token)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def needs_ray(
    command: str, train: TrainConfig, *, address: str | None, one_worker: bool, local_storage: bool
) -> bool:
    """Whether a run starts (or joins) Ray. Only ``train`` of one CPU worker on embedded Ray goes
    without (it trains in this process, ``raylens.trainer.ray_train.trains_in_driver``: seconds
    saved), and only when its checkpoints are local (on object storage Ray Train's workers write
    them) and its split is read in memory (a streamed one is dealt by Ray Train to its workers:
    without Ray started here, Ray Data would start one of its own, sized to the cores alone)."""
    return (
        command != "train"
        or address is not None
        or not one_worker
        or train.scaling.use_gpu
        or train.data != "memory"
        or not local_storage
    )


def start_ray(settings: RuntimeSettings) -> RayRuntime:
    """Connect to ``settings.address`` or start an embedded cluster; reuse one already connected.

    An embedded cluster is always a new one (``address="local"``), even when another Ray runs on
    the machine (``ray start --head`` leaves an address file that a plain ``ray.init`` would
    join, and then refuses ``num_cpus``).
    """
    import ray

    if ray.is_initialized():
        return RayRuntime(False, float(ray.cluster_resources().get("CPU", 0)), settings.address)
    runtime_env = None if settings.submitted else {"env_vars": dict(settings.worker_env)}
    with _keep_sigterm_handler():
        if settings.address:
            try:
                _join(settings, runtime_env)
            except ConnectionError as exc:
                raise UserError(
                    f"--address {settings.address}: Ray did not let this process join the cluster "
                    f"({exc}). A cluster with token auth (RAY_AUTH_MODE=token on its nodes) needs "
                    f"RAY_AUTH_MODE=token here too, and its token ({TOKEN_SOURCES}); otherwise check "
                    "that this machine runs the cluster's Ray and Python versions"
                ) from None
        else:
            ray.init(
                address="local",
                num_cpus=settings.num_cpus or embedded_cpus(),
                include_dashboard=False,
                runtime_env=runtime_env,
                logging_level=settings.logging_level,
                log_to_driver=settings.verbose,
            )
    return RayRuntime(True, float(ray.cluster_resources().get("CPU", 0)), settings.address)


def _join(settings: RuntimeSettings, runtime_env: dict[str, Any] | None, attempts: int = 3) -> None:
    """``ray.init`` at the settings' address. Through Ray Client, the cluster's proxy starts a
    server for this driver, which at times dies as it starts (forked while gRPC threads run: Ray
    logs "skipping fork() handlers"); that failure is tried again, any other is raised."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address=settings.address,
                runtime_env=runtime_env,
                logging_level=settings.logging_level,
                log_to_driver=settings.verbose,
            )
            return
        except ConnectionError as exc:
            if attempt == attempts or "Initialization failure from server" not in str(exc):
                raise
            time.sleep(2.0)


@contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """``ray.init`` replaces the SIGTERM handler with one that exits at once; when the caller
    installed its own (the CLI, to end runs as KILLED), put it back."""
    on_main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if on_main else None
    yield
    if callable(saved):
        signal.signal(signal.SIGTERM, saved)


def stop_ray(runtime: RayRuntime) -> None:
    import ray

    if runtime.started_here and ray.is_initialized():
        ray.shutdown()
