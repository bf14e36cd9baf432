"""``raylens serve``: a registered model on Ray Serve, answering real HTTP on 127.0.0.1 as the
model answers offline; bad requests refused 4xx naming the field; an alias move switches the
served version with no failed request under steady load."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from raylens.cluster.predict import load_model
from raylens.cluster.release import move_alias
from raylens.cluster.release_config import ServeConfig
from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, build_feature_set
from tests.trainer.test_artifacts import Logged, cancer_models, customer_rows, train_and_log

NAME = "cancer-served"


@dataclass
class Served:
    url: str
    first: Logged
    second: Logged
    client: Any


def post(url: str, body: Any, timeout: float = 30) -> tuple[int, dict[str, Any], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), error.headers


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    from raylens.cluster.pipeline import records_of

    return records_of(frame)


@pytest.fixture(scope="module")
def served(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from ray import serve

    from raylens.cluster.serving import ModelTarget, start_endpoint

    import_path = list(sys.path)
    first, second = cancer_models(tmp_path_factory.mktemp("served"), NAME, epochs=(3, 1))
    client = mlflow.MlflowClient(first.tracking_uri, registry_uri=first.tracking_uri)
    move_alias(client, NAME, "production", str(first.registered_version), "first release")
    endpoint = start_endpoint(
        ModelTarget(NAME, alias="production"), first.tracking_uri, ServeConfig(port=0, poll_s=0.3)
    )
    assert endpoint.url.startswith("http://127.0.0.1:")
    try:
        yield Served(endpoint.url, first, second, client)
    finally:
        serve.shutdown()
        sys.path[:] = import_path


def test_http_predictions_equal_offline_predictions_row_for_row(served: Served) -> None:
    rows = served.first.raw_test
    status, body, headers = post(f"{served.url}/predict", {"dataframe_records": records(rows)})
    assert status == 200, body
    assert headers["X-Model-Version"] == str(served.first.registered_version)
    offline = load_model(served.first.model_uri, served.first.tracking_uri)
    assert body["predictions"] == offline.predict(rows).tolist()
    assert (np.asarray(body["predictions"]) == served.first.expected).all()

    status, body, _ = post(
        f"{served.url}/invocations",
        {
            "dataframe_split": json.loads(rows.to_json(orient="split", index=False)),
            "params": {"output": "probabilities"},
        },
    )
    assert status == 200, body
    probabilities = pd.DataFrame(body["predictions"])
    expected = offline.predict(rows, params={"output": "probabilities"})
    np.testing.assert_allclose(probabilities[expected.columns].to_numpy(), expected.to_numpy(), rtol=1e-6)


def test_health_and_version_name_the_served_version(served: Served) -> None:
    status, health = get(f"{served.url}/health")
    assert status == 200 and health["status"] == "ok"
    status, version = get(f"{served.url}/version")
    assert status == 200
    assert version["model"] == NAME and version["alias"] == "production"
    assert version["feature_set"] == "cancer" and version["run_id"]


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        (lambda r: r.pop("mean radius"), 400, ["record 0", "'mean radius'", "missing"]),
        (lambda r: r.update(colour=1.0), 400, ["record 0", "unknown field 'colour'"]),
        (lambda r: r.update({"mean radius": "big"}), 400, ["record 0", "'mean radius'", "number"]),
        (lambda r: r.update({"mean radius": float("nan")}), 400, ["record 0", "'mean radius'", "finite"]),
        (lambda r: r.update({"mean radius": None}), 400, ["mean radius"]),
    ],
    ids=["missing", "extra", "wrong-type", "nan", "null"],
)
def test_a_bad_field_is_refused_naming_it(served: Served, change: Any, status: int, words: list[str]) -> None:
    record = records(served.first.raw_test.iloc[:1])[0]
    change(record)
    got, body, _ = post(f"{served.url}/predict", {"dataframe_records": [record]})
    assert got == status, body
    for word in words:
        assert word in body["error"], body


def test_bad_requests_get_4xx_never_500(served: Served) -> None:
    rows = records(served.first.raw_test.iloc[:1])
    assert post(f"{served.url}/predict", b"{not json")[0] == 400
    assert post(f"{served.url}/predict", {"rows": rows})[0] == 400
    assert post(f"{served.url}/predict", {"dataframe_records": rows * 1001})[0] == 413
    assert post(f"{served.url}/predict", {"dataframe_records": rows, "params": {"output": "votes"}})[0] == 400
    status, body, _ = post(
        f"{served.url}/predict", {"dataframe_records": rows, "params": {"online_store": "/x.db"}}
    )
    assert status == 400 and "may set only output" in body["error"]  # the server's file, not a request's
    split = {"dataframe_split": {"columns": [["mean radius"]], "data": [[1.0]]}}
    assert post(f"{served.url}/predict", split)[0] == 400
    huge = [{**rows[0], "mean radius": 10**400}]  # past a float: a 400, not a crash
    assert post(f"{served.url}/predict", {"dataframe_records": huge})[0] == 400
    assert post(f"{served.url}/nowhere", {"dataframe_records": rows})[0] == 404
    assert get(f"{served.url}/predict")[0] == 405


def test_a_bad_request_in_a_batch_spoils_only_itself(served: Served) -> None:
    good = records(served.first.raw_test.iloc[:3])
    bad = [{**good[0], "mean radius": None}]
    results: dict[str, int] = {}

    def send(key: str, body: Any) -> None:
        results[key] = post(f"{served.url}/predict", {"dataframe_records": body})[0]

    threads = [threading.Thread(target=send, args=(f"good{i}", good)) for i in range(6)]
    threads.append(threading.Thread(target=send, args=("bad", bad)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.pop("bad") == 400
    assert set(results.values()) == {200}


def test_an_unknown_alias_is_refused_before_anything_is_deployed(served: Served) -> None:
    from raylens.cluster.serving import ModelTarget, start_endpoint

    with pytest.raises(UserError, match=r"no alias 'prodcution'.*did you mean 'production'"):
        start_endpoint(ModelTarget(NAME, alias="prodcution"), served.first.tracking_uri, ServeConfig(port=0))
    with pytest.raises(UserError, match="names no registered version"):
        ModelTarget.parse("cancer-served")


def test_an_alias_move_switches_the_served_version_without_a_failed_request(served: Served) -> None:
    rows = records(served.first.raw_test.iloc[:5])
    versions: list[str] = []
    failures: list[Any] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            status, body, headers = post(f"{served.url}/predict", {"dataframe_records": rows})
            if status != 200:
                failures.append((status, body))
            versions.append(headers.get("X-Model-Version", ""))

    clients = [threading.Thread(target=load) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        time.sleep(1.0)
        move_alias(served.client, NAME, "production", str(served.second.registered_version), "retrained")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            not versions or versions[-1] != str(served.second.registered_version)
        ):
            time.sleep(0.2)
        time.sleep(0.5)
        status, body, headers = post(
            f"{served.url}/predict", {"dataframe_records": records(served.first.raw_test)}
        )
    finally:
        stop.set()
        for client in clients:
            client.join()
        move_alias(served.client, NAME, "production", str(served.first.registered_version), "put back")
    assert not failures, failures[:3]
    assert str(served.first.registered_version) in versions
    assert versions[-1] == str(served.second.registered_version), versions[-5:]
    offline = load_model(f"models:/{NAME}/{served.second.registered_version}", served.first.tracking_uri)
    assert status == 200 and headers["X-Model-Version"] == str(served.second.registered_version)
    assert body["predictions"] == offline.predict(served.first.raw_test).tolist()


def test_entity_ids_alone_are_looked_up_in_the_online_store(served: Served, tmp_path: Path) -> None:
    """A model of categorical columns and entity ids, on a second application beside the first:
    a request of ids alone gets each entity's features from the online store; with features, the
    category strings are encoded as in training."""
    from ray import serve

    from raylens.cluster.serving import ModelTarget, start_endpoint
    from raylens.features.online import SqliteOnlineStore, materialize

    frame = customer_rows()
    frame.to_parquet(tmp_path / "c.parquet")
    import_path = list(sys.path)
    fs = build_feature_set(
        "customers",
        DataConfig(source="c.parquet", target="churned", entity="customer"),
        FeaturesConfig.model_validate({"transforms": [{"one_hot": ["plan"]}, {"standardize": "*"}]}),
        tmp_path / "store",
        tmp_path,
    )
    logged = train_and_log(fs, tmp_path, epochs=40, register_as="customers")
    sys.path[:] = import_path
    store = SqliteOnlineStore(tmp_path / "online.db")
    materialize(fs, store)
    store.close()
    endpoint = start_endpoint(
        ModelTarget("customers", version="1"),
        logged.tracking_uri,
        ServeConfig(port=0),
        app="customers",
        route_prefix="/customers",
        online_store=str(tmp_path / "online.db"),
    )
    try:
        latest = frame.groupby("customer").tail(1).set_index("customer")
        ids = ["c7", "c3", "c21"]
        by_features = post(
            f"{endpoint.url}/predict", {"dataframe_records": records(latest.loc[ids, ["plan", "spend"]])}
        )
        by_ids = post(f"{endpoint.url}/predict", {"dataframe_records": [{"customer": i} for i in ids]})
        assert by_features[0] == 200 and by_ids[0] == 200, (by_features[1], by_ids[1])
        assert by_ids[1]["predictions"] == by_features[1]["predictions"]
        # Both kinds at once land in one batch: each is predicted with its own fields.
        answers: dict[str, Any] = {}
        bodies = {
            "ids": {"dataframe_records": [{"customer": i} for i in ids]},
            "features": {"dataframe_records": records(latest.loc[ids, ["plan", "spend"]])},
        }
        threads = [
            threading.Thread(
                target=lambda k=k: answers.__setitem__(k, post(f"{endpoint.url}/predict", bodies[k]))
            )
            for k in [*bodies] * 4
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (
            answers["ids"][1]["predictions"]
            == answers["features"][1]["predictions"]
            == by_ids[1]["predictions"]
        )
        empty = post(f"{endpoint.url}/predict", {"dataframe_records": [{}]})
        assert empty[0] == 400 and "no field the model takes" in empty[1]["error"]
        unknown = post(f"{endpoint.url}/predict", {"dataframe_records": [{"customer": "nobody"}]})
        assert unknown[0] == 400 and "'nobody'" in unknown[1]["error"]
        wrong = post(f"{endpoint.url}/predict", {"dataframe_records": [{"plan": 3, "spend": 1.0}]})
        assert wrong[0] == 400 and "field 'plan'" in wrong[1]["error"]
    finally:
        serve.delete("customers")
        sys.path[:] = import_path


def test_autoscaling_and_batching_come_from_the_settings() -> None:
    from raylens.cluster.serving import deployment_of

    fixed = deployment_of(ServeConfig(replicas=2, max_batch_size=16))
    assert fixed.num_replicas == 2 and fixed.max_ongoing_requests == 32
    scaled = deployment_of(ServeConfig(replicas=1, max_replicas=3, target_ongoing_requests=4))
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (
        1,
        3,
        4,
    )
    with pytest.raises(ValueError, match="max_replicas \\(1\\) is below replicas \\(2\\)"):
        ServeConfig(replicas=2, max_replicas=1)
