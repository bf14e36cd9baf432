"""Serving a registered model on Ray Serve: ``raylens serve NAME@ALIAS``.

One deployment (``ModelEndpoint``) holds the registered pyfunc model — its fitted transforms and
encoders inside, so what is served computes what was evaluated — and answers:

- ``POST /predict`` (and ``/invocations``, MLflow's path): ``{"dataframe_records": [...]}``,
  ``{"dataframe_split": {"columns": [...], "data": [[...]]}}`` or ``{"instances": [...]}``, with
  optional ``"params"`` (``output``, ``online_store``) → ``{"predictions": [...]}``;
- ``GET /health`` and ``GET /version`` (the model, its version, feature set and run).

Requests are checked against the model's signature before they are batched (``@serve.batch``), so
a bad one is answered 4xx naming the record and field, and never spoils its batch. A replica
serving an alias watches where the alias points and switches when it moves: the new version is
loaded beside the old, which answers until the swap, so no request fails across a release.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from raylens.cluster.release_config import ServeConfig
from raylens.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

PREDICT_PATHS = ("/predict", "/invocations")
RECORD_KEYS = ("dataframe_records", "dataframe_split", "instances")
VERSION_HEADER = "X-Model-Version"
LARGE_BODY_BYTES = 1 << 16
"""A body this large is parsed on a thread, not on the replica's event loop."""
MAX_BODY_BYTES = 32 << 20
"""A body larger than this is refused (HTTP 413) before it is parsed."""
REQUEST_PARAMS = ("output",)
NUMBER_TYPES = {"double", "float"}
WHOLE_TYPES = {"long", "integer"}


class RequestError(Exception):
    """A request the model cannot take: the HTTP status and the message naming what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    """MLflow's column type name: double, float, long, integer, boolean, string, or any."""
    required: bool


@dataclass(frozen=True)
class ModelTarget:
    """What ``raylens serve`` was asked for: a registered model's alias, or one version."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelTarget:
        """``NAME@ALIAS``, ``NAME/VERSION`` or the same after ``models:/``."""
        reference = text.removeprefix("models:/").strip("/")
        name, at, alias = reference.partition("@")
        if at and name and alias:
            return cls(name, alias=alias)
        name, slash, version = reference.partition("/")
        if slash and name and version.isdigit():
            return cls(name, version=version)
        raise UserError(
            f"MODEL: '{text}' names no registered version; write NAME@ALIAS (e.g. churn@production), "
            "NAME/VERSION, or either after models:/"
        )

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def resolve_version(client: Any, target: ModelTarget) -> str:
    """The version ``target`` names now; ``UserError`` for an unknown model, alias or version."""
    from mlflow.exceptions import MlflowException

    from raylens.cluster.release import registered_model

    model = registered_model(client, target.name)
    if target.version is not None:
        try:
            client.get_model_version(target.name, target.version)
        except MlflowException:
            raise UserError(
                f"MODEL: registered model '{target.name}' has no version {target.version}"
            ) from None
        return target.version
    aliases = dict(getattr(model, "aliases", {}) or {})
    if target.alias not in aliases:
        raise UserError(
            f"MODEL: registered model '{target.name}' has no alias '{target.alias}'"
            f"{did_you_mean(str(target.alias), aliases)}; its aliases: "
            f"{', '.join(f'{a} → version {v}' for a, v in aliases.items()) or 'none'} "
            f"(move one with `raylens promote {target.name} VERSION --alias {target.alias}`)"
        )
    return str(aliases[target.alias])


def signature_fields(model: Any) -> list[Field]:
    """The request fields a loaded pyfunc model's signature declares."""
    schema = model.metadata.get_input_schema()
    if schema is None:
        return []
    fields = []
    for spec in schema.inputs:
        kind = getattr(spec.type, "name", None) or str(spec.type)
        fields.append(
            Field(str(spec.name), "any" if "Any" in type(spec.type).__name__ else kind, spec.required)
        )
    return fields


def parse_request(body: bytes, fields: Sequence[Field], max_rows: int) -> tuple[Any, dict[str, Any]]:
    """A request body as the model's input frame and params; ``RequestError`` (4xx) naming the
    record and field that is wrong."""
    try:
        return _parse(body, fields, max_rows)
    except (OverflowError, TypeError, ValueError) as error:  # e.g. a whole number past int64
        raise RequestError(400, f"the body's values cannot be read as the model's fields ({error})") from None


def _parse(body: bytes, fields: Sequence[Field], max_rows: int) -> tuple[Any, dict[str, Any]]:
    import pandas as pd

    if len(body) > MAX_BODY_BYTES:
        raise RequestError(413, f"the body holds {len(body)} bytes; send at most {MAX_BODY_BYTES}")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the body is not JSON ({error})") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"send a JSON object with one of {', '.join(RECORD_KEYS)}")
    unknown = [k for k in payload if k not in (*RECORD_KEYS, "params")]
    given = [k for k in RECORD_KEYS if k in payload]
    if unknown or len(given) != 1:
        hint = did_you_mean(unknown[0], RECORD_KEYS) if unknown else ""
        raise RequestError(
            400,
            f"send exactly one of {', '.join(RECORD_KEYS)} (and optionally params)"
            + (f"; unknown key '{unknown[0]}'{hint}" if unknown else ""),
        )
    params = payload.get("params") or {}
    if not isinstance(params, dict):
        raise RequestError(400, 'params: send an object, e.g. {"output": "probabilities"}')
    for key in params:
        if key not in REQUEST_PARAMS:
            # The online store is a file of the server's: named by whoever runs it, not by a request.
            raise RequestError(400, f"params.{key}: a request may set only {', '.join(REQUEST_PARAMS)}")
    records = _records(given[0], payload[given[0]])
    if not records:
        raise RequestError(400, f"{given[0]}: no rows to predict")
    if len(records) > max_rows:
        raise RequestError(413, f"{given[0]}: {len(records)} rows; send at most {max_rows} per request")
    by_name = {f.name: f for f in fields}
    columns: dict[str, list[Any]] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise RequestError(400, f"record {i}: send an object of field → value")
        for key in record:
            if key not in by_name:
                raise RequestError(
                    400,
                    f"record {i}: unknown field '{key}'{did_you_mean(str(key), by_name)}; the model takes: "
                    + ", ".join(by_name),
                )
        for spec in fields:
            if spec.name not in record:
                if spec.required:
                    raise RequestError(400, f"record {i}: field '{spec.name}' is missing")
                continue
            columns.setdefault(spec.name, [None] * i).append(_checked(record[spec.name], spec, i))
        for values in columns.values():  # a field an earlier record had and this one lacks
            if len(values) == i:
                values.append(None)
    if not columns:
        raise RequestError(400, f"record 0: no field the model takes; it takes: {', '.join(by_name)}")
    frame = pd.DataFrame({name: _column(values, by_name[name]) for name, values in columns.items()})
    return frame, params


def _records(key: str, value: Any) -> list[Any]:
    if key != "dataframe_split":
        if not isinstance(value, list):
            raise RequestError(400, f"{key}: send a list of records")
        return value
    if not isinstance(value, dict) or not isinstance(value.get("columns"), list):
        raise RequestError(400, 'dataframe_split: send {"columns": [...], "data": [[...], ...]}')
    columns, rows = value["columns"], value.get("data")
    if not all(isinstance(column, str) for column in columns):
        raise RequestError(400, "dataframe_split.columns: send the field names, as strings")
    if not isinstance(rows, list):
        raise RequestError(400, "dataframe_split.data: send a list of rows")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise RequestError(
                400, f"dataframe_split.data[{i}]: send a list of {len(columns)} values, one per column"
            )
        records.append(dict(zip(columns, row, strict=True)))
    return records


def _checked(value: Any, spec: Field, record: int) -> Any:
    where = f"record {record}: field '{spec.name}'"
    if value is None or spec.type == "any":
        return value  # a missing value: the model refuses it unless the column is imputed
    if spec.type in NUMBER_TYPES or spec.type in WHOLE_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(400, f"{where} is {value!r}; send a number ({spec.type})")
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(
                400,
                f"{where} is {value}; send a finite number, or null where the model imputes missing values",
            )
        if spec.type in WHOLE_TYPES and isinstance(value, float) and not value.is_integer():
            raise RequestError(400, f"{where} is {value}; send a whole number ({spec.type})")
        return value
    if spec.type == "boolean" and not isinstance(value, bool):
        raise RequestError(400, f"{where} is {value!r}; send true or false")
    if spec.type == "string" and not isinstance(value, str):
        raise RequestError(400, f"{where} is {value!r}; send a string")
    return value


def _column(values: list[Any], spec: Field) -> Any:
    import numpy as np

    if spec.type in NUMBER_TYPES:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if spec.type in WHOLE_TYPES and None not in values:
        return np.array(values, dtype=np.int64)
    return np.array(values, dtype=object) if spec.type != "any" else values


# ----- the deployment ---------------------------------------------------------------------------


@dataclass
class Served:
    """One loaded version: the pyfunc model, its python model (called directly: the request was
    checked against the signature already) and what ``/version`` reports."""

    model: Any
    version: str
    fields: list[Field]
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, frame: Any, params: Mapping[str, Any]) -> Any:
        return self.model.unwrap_python_model().predict(None, frame, dict(params))


def load_served(client: Any, target: ModelTarget, tracking_uri: str) -> Served:
    from raylens.cluster.predict import load_model

    version = resolve_version(client, target)
    model = load_model(f"models:/{target.name}/{version}", tracking_uri)
    metadata = model.metadata
    info = {
        "model": target.name,
        "alias": target.alias,
        "version": version,
        "run_id": metadata.run_id,
        **{
            k: v
            for k, v in (metadata.metadata or {}).items()
            if k in ("feature_set", "feature_set_version", "task")
        },
    }
    return Served(model, version, signature_fields(model), info)


def predictions_json(output: Any) -> list[Any]:
    """What a prediction answers: labels or values, or one object of class probabilities per row."""
    import numpy as np

    if hasattr(output, "to_dict") and hasattr(output, "columns"):
        return list(output.to_dict(orient="records"))
    values = np.asarray(output)
    return list(values.tolist())


class ModelEndpoint:
    """The Ray Serve deployment's class (made a deployment by ``deployment_of``)."""

    def __init__(
        self, target: ModelTarget, tracking_uri: str, config: ServeConfig, online_store: str | None
    ) -> None:
        import mlflow

        self.target, self.tracking_uri, self.config = target, tracking_uri, config
        self.client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
        self.defaults = {"online_store": online_store} if online_store else {}
        self.served = load_served(self.client, target, tracking_uri)
        batching: Any = self.predict_batch  # @serve.batch's wrapper takes its settings
        batching.set_max_batch_size(config.max_batch_size)
        batching.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.stopped = threading.Event()
        if target.alias is not None:
            threading.Thread(target=self._watch_alias, name="alias-watch", daemon=True).start()

    def _watch_alias(self) -> None:
        """Load the version the alias points at when it moves, then swap: requests in between
        are answered by the version loaded before."""
        while not self.stopped.wait(self.config.poll_s):
            try:
                version = resolve_version(self.client, self.target)
                if version != self.served.version:
                    loaded = load_served(
                        self.client, ModelTarget(self.target.name, version=version), self.tracking_uri
                    )
                    loaded.info["alias"] = self.target.alias
                    self.served = loaded  # one assignment: a request sees the old or the new
            except Exception as error:  # the registry or the new version unreadable: keep serving
                logger.warning("%s: still serving version %s: %s", self.target, self.served.version, error)

    def __del__(self) -> None:
        self.stopped.set()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        served = self.served  # one version answers the whole request
        headers = {VERSION_HEADER: served.version}
        path = request.url.path
        prefix = request.scope.get("root_path", "")  # the application's route prefix
        if prefix and path.startswith(prefix):
            path = path[len(prefix) :]
        path = path.rstrip("/") or "/"
        if path in ("/health", "/version"):
            if request.method != "GET":
                return JSONResponse({"error": f"{path} takes GET"}, status_code=405, headers=headers)
            body = {"status": "ok", **served.info} if path == "/health" else served.info
            return JSONResponse(body, headers=headers)
        if path not in PREDICT_PATHS:
            return JSONResponse(
                {"error": f"no route {path}; POST /predict, GET /health or GET /version"}, status_code=404
            )
        if request.method != "POST":
            return JSONResponse(
                {"error": f"{path} takes POST with a JSON body"}, status_code=405, headers=headers
            )
        try:
            body = await request.body()
            limit = self.config.max_request_rows
            if len(body) > LARGE_BODY_BYTES:  # parsed beside the event loop, which goes on batching
                frame, params = await asyncio.to_thread(parse_request, body, served.fields, limit)
            else:
                frame, params = parse_request(body, served.fields, limit)
            output = await self.predict_batch((served, frame, {**self.defaults, **params}))
            if isinstance(output, RequestError):
                raise output
        except RequestError as error:
            return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)
        return JSONResponse({"predictions": predictions_json(output)}, headers=headers)

    @serve.batch
    async def predict_batch(self, requests: list[tuple[Served, Any, dict[str, Any]]]) -> list[Any]:
        """Requests asking the same version for the same output with the same fields are predicted
        in one call, beside the event loop (which goes on taking requests for the next batch); a
        request the model refuses is answered alone (400), the others still predicted."""
        import pandas as pd
        from mlflow.exceptions import MlflowException

        results: list[Any] = [None] * len(requests)
        groups: dict[tuple[int, str, tuple[str, ...]], list[int]] = {}
        for i, (served, frame, params) in enumerate(requests):
            # Fields differ where all are optional (ids alone, or the features): never concatenated.
            key = (id(served), json.dumps(params, sort_keys=True, default=str), tuple(frame.columns))
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            served, _, params = requests[members[0]]
            frames = [requests[i][1] for i in members]
            try:
                output = await asyncio.to_thread(
                    served.predict,
                    pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0],
                    params,
                )
            except MlflowException:
                for i in members:  # find which request it was: each alone
                    try:
                        results[i] = await asyncio.to_thread(served.predict, requests[i][1], params)
                    except MlflowException as error:
                        results[i] = RequestError(400, error.message)
                continue
            start = 0
            for i in members:
                rows = len(requests[i][1])
                results[i] = (
                    output.iloc[start : start + rows]
                    if hasattr(output, "iloc")
                    else output[start : start + rows]
                )
                start += rows
        return results


def deployment_of(config: ServeConfig) -> Any:
    """``ModelEndpoint`` as a Ray Serve deployment with the spec's replicas and batching."""
    scaling: dict[str, Any] = {"num_replicas": config.replicas}
    if config.max_replicas is not None and config.max_replicas > config.replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": config.replicas,
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": config.target_ongoing_requests,
            }
        }
    return serve.deployment(
        ModelEndpoint,
        name="model",
        ray_actor_options={"num_cpus": config.cpus_per_replica},
        # Enough requests in flight per replica to fill a batch (Ray Serve's default is 5).
        max_ongoing_requests=max(2 * config.max_batch_size, 8),
        **scaling,
    )


@dataclass(frozen=True)
class Endpoint:
    url: str
    target: ModelTarget
    version: str
    app: str


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def start_endpoint(
    target: ModelTarget,
    tracking_uri: str,
    config: ServeConfig,
    *,
    app: str = "raylens",
    route_prefix: str = "/",
    online_store: str | None = None,
) -> Endpoint:
    """Deploy ``target`` on the connected Ray cluster's Serve (started on ``config``'s host and
    port when it is not running) and wait until it answers. ``UserError`` before anything is
    deployed for an unknown model, alias or version."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = resolve_version(client, target)
    port = config.port or free_port(config.host)
    serve.start(
        http_options={"host": config.host, "port": port},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    deployment = deployment_of(config)
    serve.run(
        deployment.bind(target, tracking_uri, config, online_store),
        name=app,
        route_prefix=route_prefix,
        blocking=False,
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    host = serve_http_address()
    return Endpoint(f"{host}{route_prefix.rstrip('/')}", target, version, app)


def serve_http_address() -> str:
    """Where the running Serve's proxy listens (the options it was started with win over ours)."""
    from ray.serve.context import _get_global_client

    client: Any = _get_global_client()
    options = client.http_config
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    return f"http://{host}:{options.port}"
