"""The registered model artifact, with real MLflow (SQLite in tmp_path) and no Ray.

It predicts from raw rows what the torch model predicts from stored features, refuses rows it
cannot predict with an error naming the columns, and installs and serves from its own
requirements in a fresh virtual environment that has no raylens.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.exceptions import MlflowException
from sklearn.datasets import load_iris

from raylens.features import (
    DataConfig,
    FeaturesConfig,
    FeatureSet,
    build_feature_set,
    invert_all,
    transforms_from_dicts,
)
from raylens.features.online import SqliteOnlineStore, materialize
from raylens.features.splits import split_rows
from raylens.trainer import Batches, TorchModelConfig, TrainConfig, TrainJob, TrainState, build_model, fit
from raylens.trainer.artifacts import pip_requirements
from raylens.trainer.family import Trained
from raylens.trainer.loop import make_optimizer, predict
from raylens.trainer.metrics import SplitScores, score_test_split
from raylens.trainer.torch_family import TorchPredictor
from raylens.trainer.tracking import MlflowTracker
from tests.conftest import ModelVenv

INSTALL_TIMEOUT_S = 900
SERVE_TIMEOUT_S = 180


class Discard:
    def report(self, metrics: dict[str, float], state: TrainState) -> None:
        pass


@dataclass(frozen=True)
class Logged:
    tracking_uri: str
    model_uri: str
    registered_version: str | None
    raw_test: pd.DataFrame
    """The test split's rows as the user has them (the fitted transforms undone)."""
    expected: np.ndarray
    """The torch model's own predictions on the stored test features, as labels."""
    model: torch.nn.Module
    job: TrainJob
    scores: SplitScores
    """The test metrics the version was described with."""


def train_and_log(
    fs: FeatureSet, folder: Path, *, epochs: int, register_as: str | None, **train: Any
) -> Logged:
    job = TrainJob.for_feature_set(
        TorchModelConfig(params={"hidden": [16]}),
        TrainConfig(epochs=epochs, batch_size=16, optimizer={"lr": 0.01}, **train),
        fs,
    )
    torch.manual_seed(0)
    model = build_model(job.model, job.in_features, job.task.out_features)
    train, test = fs.read("train"), fs.read("test")
    fit(
        model,
        make_optimizer(model, job.train.optimizer),
        Batches.from_numpy(train.x, train.y),
        job.task,
        epochs=epochs,
        batch_size=job.train.batch_size,
        seed=0,
        reporter=Discard(),
    )
    tracking_uri = f"sqlite:///{folder}/mlflow.db"
    tracker = MlflowTracker(tracking_uri, "artifacts-test", folder / "mlartifacts")
    run_id = tracker.start_run("train")
    import_path = list(sys.path)
    predictor = TorchPredictor(model, job.task)
    scores = score_test_split(predictor, test.x, test.y, job.task, fs.classes)
    logged = tracker.log_model(
        run_id,
        Trained(predictor, [], folder),
        job,
        fs,
        x_sample=test.x,
        register_as=register_as,
        headline=scores.overall,
    )
    model_uri, version = logged.uri, logged.version
    assert sys.path == import_path, "logging the model changed this process's import path"
    tracker.end_run(run_id)
    columns = fs.feature_columns
    raw = invert_all(transforms_from_dicts(fs.manifest.transforms), test.x, columns)
    labels = np.asarray(fs.classes)[predict(model, torch.from_numpy(test.x), job.task)]
    return Logged(
        tracking_uri,
        f"models:/{register_as}/{version}" if register_as else model_uri,
        version,
        pd.DataFrame(raw, columns=columns),
        labels,
        model,
        job,
        scores,
    )


def cancer_models(folder: Path, register_as: str, epochs: Sequence[int]) -> list[Logged]:
    """Binary classifiers of scikit-learn's breast cancer data, one per entry of ``epochs``,
    registered as versions 1, 2, ... of ``register_as``; this process's import path kept."""
    import_path = list(sys.path)
    fs = build_feature_set(
        "cancer",
        DataConfig(source="sklearn:breast_cancer", target="target"),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        folder / "store",
    )
    logged = [train_and_log(fs, folder, epochs=n, register_as=register_as) for n in epochs]
    sys.path[:] = import_path
    return logged


def customer_rows(rows: int = 300, seed: int = 2) -> pd.DataFrame:
    """Customers (40 ids, several rows each) on plans, with a spend, churning on basic and low spend."""
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "plus", "pro"], rows)
    spend = rng.normal(100, 30, rows)
    return pd.DataFrame(
        {
            "customer": [f"c{i % 40}" for i in range(rows)],
            "plan": plan,
            "spend": spend,
            "churned": ((plan == "basic") & (spend < 110)).astype(int),
        }
    )


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model puts its code folder in front of sys.path: undo that after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_model_predicts_like_torch_and_refuses_rows_it_cannot_predict(
    iris: FeatureSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: None
) -> None:
    logged = train_and_log(iris, tmp_path, epochs=30, register_as="iris-classifier")
    assert logged.registered_version == "1"
    assert len(set(logged.expected)) == 3, "the torch model should tell the three classes apart"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    model = mlflow.pyfunc.load_model(logged.model_uri)

    assert model.predict(logged.raw_test).tolist() == logged.expected.tolist()

    column = iris.feature_columns[2]
    for value, kind in [(math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "-inf"), (None, "NaN")]:
        bad = logged.raw_test.astype({column: object if value is None else float})
        bad.loc[[0, 3], column] = value
        with pytest.raises(MlflowException) as refused:
            model.predict(bad)
        assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
        assert f"column '{column}' rows [0, 3] ({kind})" in refused.value.message, refused.value.message
        assert "models:/iris-classifier takes finite numbers" in refused.value.message

    with pytest.raises(MlflowException, match=re.escape(repr(column))) as refused:
        model.predict(logged.raw_test.drop(columns=[column]))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"


def test_a_classifier_returns_its_networks_probabilities_loaded_and_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: None
) -> None:
    cancer = build_feature_set(
        "breast_cancer",
        DataConfig(source="sklearn:breast_cancer", target="target"),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        tmp_path / "store",
    )
    logged = train_and_log(cancer, tmp_path, epochs=10, register_as="cancer", class_weights="balanced")
    assert len(set(logged.expected)) == 2, "a model that predicts one class proves little"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    model = mlflow.pyfunc.load_model(logged.model_uri)
    assert model.metadata.signature.params.to_dict() == [
        {"name": "output", "type": "string", "default": "labels", "shape": None}
    ]

    probabilities = model.predict(logged.raw_test, params={"output": "probabilities"})
    test = cancer.read("test")
    network = torch.softmax(logged.model(torch.from_numpy(test.x)).detach().double(), dim=1).numpy()
    assert list(probabilities.columns) == ["0", "1"]  # str(label), in the order of the classes
    # Raw rows go through the fitted transforms again: float32 round trips, nothing more.
    assert probabilities.to_numpy() == pytest.approx(network, abs=1e-5)
    assert np.abs(probabilities.sum(axis=1).to_numpy() - 1).max() < 1e-12
    labels = np.asarray(cancer.classes)[probabilities.to_numpy().argmax(axis=1)]
    assert model.predict(logged.raw_test).tolist() == labels.tolist() == logged.expected.tolist()

    # As the scoring server parses a request (`mlflow models serve` takes the same body).
    request = {
        "dataframe_split": logged.raw_test.to_dict(orient="split", index=False),
        "params": {"output": "probabilities"},
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    mlflow.models.predict(
        logged.model_uri,
        input_path=str(tmp_path / "request.json"),
        output_path=str(tmp_path / "answer.json"),
        env_manager="local",
    )
    served = pd.DataFrame(json.loads((tmp_path / "answer.json").read_text())["predictions"])
    assert list(served.columns) == ["0", "1"]
    assert served.to_numpy() == pytest.approx(probabilities.to_numpy(), abs=1e-12)

    with pytest.raises(MlflowException) as refused:
        model.predict(logged.raw_test, params={"output": "proba"})
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert refused.value.message == (
        "params.output: 'proba' is not an output of models:/cancer; use one of 'labels', 'probabilities'"
    )

    version = mlflow.MlflowClient(logged.tracking_uri).get_model_version("cancer", "1")
    for name in ("test_roc_auc", "test_pr_auc", "test_precision", "test_recall", "test_f1", "test_log_loss"):
        assert version.tags[name] == f"{logged.scores.overall[name]:.6g}", name


def test_probabilities_are_named_by_label_and_versions_get_no_per_class_tags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: None
) -> None:
    frame = load_iris(as_frame=True).frame
    frame["target"] = np.array(["Iris setosa", "Iris versicolor", "Iris virginica"])[frame["target"]]
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "iris.parquet")
    fs = build_feature_set(
        "named",
        DataConfig(source=str(tmp_path / "iris.parquet"), target="target"),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        tmp_path / "store",
    )
    logged = train_and_log(fs, tmp_path, epochs=30, register_as="named")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    model = mlflow.pyfunc.load_model(logged.model_uri)
    probabilities = model.predict(logged.raw_test, params={"output": "probabilities"})
    assert list(probabilities.columns) == ["Iris setosa", "Iris versicolor", "Iris virginica"]
    assert model.predict(logged.raw_test).tolist() == list(probabilities.idxmax(axis=1))

    assert logged.scores.per_class["test_recall_Iris_setosa"] == 1.0  # setosa is told apart
    tags = mlflow.MlflowClient(logged.tracking_uri).get_model_version("named", "1").tags
    assert tags["test_log_loss"] == f"{logged.scores.overall['test_log_loss']:.6g}"
    assert not [t for t in tags if t.startswith(("test_precision", "test_recall", "test_roc"))], tags


def test_integer_and_boolean_columns_refuse_missing_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: None
) -> None:
    """MLflow's schema check runs before predict and treats each column type its own way: every
    path must end in an error that names the column, never in a prediction."""
    rows = 40
    table = pa.table(
        {
            "size": np.linspace(0.0, 1.0, rows),
            "count": np.arange(rows, dtype=np.int64),
            "flag": np.arange(rows) % 3 == 0,
            "label": np.arange(rows) % 2,
        }
    )
    pq.write_table(table, tmp_path / "mixed.parquet")
    fs = build_feature_set(
        "mixed",
        DataConfig(source=str(tmp_path / "mixed.parquet"), target="label"),
        FeaturesConfig(transforms=[{"standardize": "*"}]),
        tmp_path / "store",
    )
    logged = train_and_log(fs, tmp_path, epochs=1, register_as=None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    model = mlflow.pyfunc.load_model(logged.model_uri)
    good = pd.DataFrame({"size": [0.5, 0.25], "count": [3, 4], "flag": [True, False]})
    assert len(model.predict(good)) == 2

    def refused(frame: pd.DataFrame) -> str:
        with pytest.raises(MlflowException) as error:
            model.predict(frame)
        assert error.value.error_code == "INVALID_PARAMETER_VALUE"
        return error.value.message

    # An integer column holding NaN or inf is float to pandas: MLflow's schema check refuses it.
    for value in (math.nan, math.inf):
        assert "column count" in refused(good.assign(count=[value, 4]))
    # A boolean column holding None passes the schema check as objects and reaches predict.
    assert "column 'flag' row [1] (NaN)" in refused(good.assign(flag=[True, None]))

    # Over JSON, as the scoring server parses it: null in a boolean column must not become False.
    def served(data: list[list[Any]]) -> str:
        body = tmp_path / "request.json"
        body.write_text(json.dumps({"dataframe_split": {"columns": list(good.columns), "data": data}}))
        with pytest.raises(MlflowException) as error:
            mlflow.models.predict(logged.model_uri, input_path=str(body), env_manager="local")
        return error.value.message

    assert "column 'flag' row [0] (NaN)" in served([[0.5, 3, None]])
    assert "column 'flag' row [0] (not a number)" in served([[0.5, 3, "no"]])
    assert "column count" in served([[0.5, None, True]])


def test_a_csv_with_integer_columns_is_scored_as_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: None
) -> None:
    """Integer columns stay integers from the CSV to the model's signature: the rows a user reads
    with pandas from the same file are scored as the torch model scores the stored features."""
    rng = np.random.default_rng(0)
    rooms, age = rng.integers(1, 6, 120), rng.integers(0, 50, 120)
    label = (rooms * 10 - age + rng.normal(0, 3, 120) > 0).astype(int)
    area = np.round(rooms * 20.5 + rng.normal(0, 5, 120), 2)
    pd.DataFrame({"rooms": rooms, "age": age, "area": area, "label": label}).to_csv(
        tmp_path / "h.csv", index=False
    )
    data = DataConfig(source="h.csv", target="label", split={"valid": 0.2, "test": 0.25, "seed": 1})
    fs = build_feature_set(
        "houses", data, FeaturesConfig(transforms=[{"standardize": "*"}]), tmp_path / "s", tmp_path
    )
    assert [fs.manifest.raw_schema[c] for c in ("rooms", "age")] == ["int64", "int64"]
    logged = train_and_log(fs, tmp_path, epochs=20, register_as=None)
    assert len(set(logged.expected)) == 2, "a constant model proves nothing here"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    model = mlflow.pyfunc.load_model(logged.model_uri)
    as_read = pd.read_csv(tmp_path / "h.csv")
    test_rows = split_rows(as_read["label"].to_numpy(), data.split, stratify=True).test
    raw = as_read.iloc[test_rows].drop(columns=["label"]).reset_index(drop=True)
    assert str(raw["rooms"].dtype) == "int64"
    assert model.predict(raw).tolist() == logged.expected.tolist()


def test_string_and_bucketized_columns_are_encoded_by_the_model_as_in_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: None
) -> None:
    """The registered model takes the source's own columns (strings, numbers to bucket, missing
    values with an indicator) and encodes them with the encoders fitted on the training split."""
    rng = np.random.default_rng(1)
    rows = 240
    plan = rng.choice(["basic", "plus", "pro"], rows)
    income = rng.exponential(1000, rows)
    age = np.round(rng.normal(40, 12, rows), 1)
    age[rng.random(rows) < 0.1] = np.nan
    label = ((plan == "pro") | (income > 1500)).astype(int)
    frame = pd.DataFrame({"plan": plan, "income": income, "age": age, "label": label})
    frame.to_csv(tmp_path / "c.csv", index=False)
    data = DataConfig(source="c.csv", target="label", split={"valid": 0.2, "test": 0.25, "seed": 1})
    features = FeaturesConfig.model_validate(
        {
            "transforms": [
                {"one_hot": ["plan"]},
                {"bucketize": {"columns": ["income"], "bins": 5}},
                {"impute": {"columns": ["age"], "indicator": True}},
                {"standardize": "*"},
            ]
        }
    )
    fs = build_feature_set("customers", data, features, tmp_path / "s", tmp_path)
    logged = train_and_log(fs, tmp_path, epochs=40, register_as="customers")
    assert len(set(logged.expected)) == 2, "a constant model proves nothing here"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    model = mlflow.pyfunc.load_model(logged.model_uri)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["plan", "income", "age"]
    as_read = pd.read_csv(tmp_path / "c.csv")
    test_rows = split_rows(as_read["label"].to_numpy(), data.split, stratify=True).test
    raw = as_read.iloc[test_rows].drop(columns=["label"]).reset_index(drop=True)
    assert raw["age"].isna().any(), "a missing age should be among the rows scored"
    assert model.predict(raw).tolist() == logged.expected.tolist()

    unseen = raw.head(2).assign(plan=["enterprise", "basic"])
    assert len(model.predict(unseen)) == 2  # a plan training never saw: the <other> column
    with pytest.raises(MlflowException, match="column income"):  # MLflow's schema check says it first
        model.predict(raw.head(2).astype({"income": object}).assign(income=["high", "1.0"]))


def test_given_entity_ids_alone_the_model_looks_their_features_up_in_the_online_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: None
) -> None:
    frame = customer_rows()
    frame.to_parquet(tmp_path / "c.parquet")
    data = DataConfig(source="c.parquet", target="churned", entity="customer")
    features = FeaturesConfig.model_validate({"transforms": [{"one_hot": ["plan"]}, {"standardize": "*"}]})
    fs = build_feature_set("customers", data, features, tmp_path / "s", tmp_path)
    logged = train_and_log(fs, tmp_path, epochs=40, register_as=None)
    store = SqliteOnlineStore(tmp_path / "online.db")
    materialize(fs, store)
    store.close()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    model = mlflow.pyfunc.load_model(logged.model_uri)
    latest = frame.groupby("customer").tail(1).set_index("customer")
    ids = ["c7", "c3", "c21", "c3"]
    by_features = model.predict(latest.loc[ids, ["plan", "spend"]].reset_index(drop=True))
    assert len(set(model.predict(latest[["plan", "spend"]].reset_index(drop=True)))) == 2
    online = {"online_store": str(tmp_path / "online.db")}
    assert model.predict(pd.DataFrame({"customer": ids}), params=online).tolist() == by_features.tolist()
    monkeypatch.setenv("RAYLENS_ONLINE_STORE", online["online_store"])
    assert model.predict(pd.DataFrame({"customer": ids})).tolist() == by_features.tolist()
    # `raylens predict` of a file of ids alone, as a user scores a batch of customers.
    from raylens.cluster.predict import predict_files

    pd.DataFrame({"customer": ids}).to_csv(tmp_path / "ids.csv", index=False)
    done = predict_files(
        logged.model_uri,
        tmp_path / "ids.csv",
        tmp_path / "out.csv",
        tracking_uri=logged.tracking_uri,
        keep=["customer"],
        workers=1,
    )
    scored = pd.read_csv(done.out)
    assert scored["customer"].tolist() == ids and scored["prediction"].tolist() == by_features.tolist()

    with pytest.raises(
        MlflowException, match=r"2 'customer' ids are not in the online store .*'nobody', 'c99'"
    ):
        model.predict(pd.DataFrame({"customer": ["c3", "nobody", "c99"]}))
    monkeypatch.delenv("RAYLENS_ONLINE_STORE")
    with pytest.raises(MlflowException, match="input holds only 'customer' ids") as refused:
        model.predict(pd.DataFrame({"customer": ids}))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="no such file"):
        model.predict(pd.DataFrame({"customer": ids}), params={"online_store": str(tmp_path / "none.db")})
    assert not (tmp_path / "none.db").exists()
    with pytest.raises(MlflowException, match="missing feature columns 'spend'"):
        model.predict(pd.DataFrame({"plan": ["basic"]}))


def test_an_identical_model_is_not_registered_twice_and_versions_are_described(
    iris: FeatureSet, tmp_path: Path, loader: None
) -> None:
    first = train_and_log(iris, tmp_path, epochs=3, register_as="iris-once")
    again = train_and_log(iris, tmp_path, epochs=3, register_as="iris-once")  # same seed: same weights
    other = train_and_log(iris, tmp_path, epochs=4, register_as="iris-once")
    assert (first.registered_version, again.registered_version, other.registered_version) == ("1", "1", "2")
    client = mlflow.MlflowClient(first.tracking_uri)
    assert sorted(str(v.version) for v in client.search_model_versions("name='iris-once'")) == ["1", "2"]
    version = client.get_model_version("iris-once", "1")
    assert f"feature set iris@{iris.version}" in version.description
    assert version.tags["raylens.feature_set_version"] == iris.version
    assert len(version.tags["raylens.model_digest"]) == 64


def test_the_model_pins_exactly_what_its_loader_imports() -> None:
    pinned = dict(requirement.split("==") for requirement in pip_requirements())
    assert set(pinned) == {
        "mlflow",
        "cloudpickle",
        "torch",
        "numpy",
        "pandas",
        "pyarrow",
        "scikit-learn",
        "pydantic",
    }
    assert all(re.fullmatch(r"\d+(\.\d+)*", version) for version in pinned.values()), pinned
    assert pinned["torch"] == torch.__version__.split("+")[0]


def test_loader_imports_neither_ray_nor_the_cli() -> None:
    """Loading a model pulls in nothing the served environment may lack."""
    code = (
        "import sys, raylens.trainer.artifacts; "
        "print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'ray', 'typer', 'rich', 'matplotlib', 'sklearn'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_installs_and_serves_without_raylens(
    iris: FeatureSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: None, model_venv: ModelVenv
) -> None:
    started = time.perf_counter()
    logged = train_and_log(iris, tmp_path, epochs=30, register_as="iris-classifier")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.tracking_uri)
    folder = Path(mlflow.artifacts.download_artifacts(logged.model_uri, dst_path=str(tmp_path / "model")))
    requirements = (folder / "requirements.txt").read_text().split()
    assert requirements == pip_requirements()
    assert (folder / "code" / "raylens" / "trainer" / "artifacts.py").is_file()
    assert not list(folder.rglob("__pycache__"))

    venv = model_venv.folder / "venv"
    install_started = time.perf_counter()
    python = model_venv.wait(timeout=INSTALL_TIMEOUT_S)  # installing since the tests were collected
    install_s = time.perf_counter() - install_started
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    no_raylens = subprocess.run(
        [str(python), "-c", "import raylens"], cwd=neutral, env=env, capture_output=True, text=True
    )
    assert no_raylens.returncode != 0 and "No module named 'raylens'" in no_raylens.stderr
    # Loading imports raylens from the model's code folder only, and with it neither Ray nor the CLI.
    chain = (
        "import sys, mlflow; mlflow.pyfunc.load_model(sys.argv[1]); import raylens; "
        "print(raylens.__file__); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'typer', 'rich'}))"
    )
    loaded = subprocess.run(
        [str(python), "-c", chain, str(folder)], cwd=neutral, env=env, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr
    code_file, unwanted = loaded.stdout.split()[-2:]
    assert Path(code_file).is_relative_to(folder / "code") and unwanted == "[]", loaded.stdout

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    serve_started = time.perf_counter()
    server = subprocess.Popen(
        [
            str(venv / "bin" / "mlflow"),
            "models",
            "serve",
            "-m",
            logged.model_uri,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=neutral,
        # As in an activated venv: the CLI starts the server as `uvicorn`, looked up on PATH.
        env={
            **env,
            "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}",
            "VIRTUAL_ENV": str(venv),
            "MLFLOW_TRACKING_URI": logged.tracking_uri,
        },
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
                assert time.perf_counter() - serve_started < SERVE_TIMEOUT_S, "the server never answered"
                time.sleep(0.5)
        serve_s = time.perf_counter() - serve_started

        status, body = post(f"{url}/invocations", logged.raw_test)
        assert status == 200, body
        assert json.loads(body)["predictions"] == logged.expected.tolist()

        status, body = post(f"{url}/invocations", logged.raw_test, params={"output": "probabilities"})
        assert status == 200, body
        rows = json.loads(body)["predictions"]
        assert [max(row, key=row.get) for row in rows] == [str(label) for label in logged.expected]
        assert all(list(row) == ["0", "1", "2"] and abs(sum(row.values()) - 1) < 1e-9 for row in rows)

        column = iris.feature_columns[1]
        bad = logged.raw_test.head(3).copy()
        bad.loc[1, column] = math.nan
        status, body = post(f"{url}/invocations", bad)
        assert status == 400, body
        assert f"column '{column}' row [1] (NaN)" in json.loads(body)["message"], body
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    print(
        f"waited {install_s:.0f} s for the venv, server answered after {serve_s:.1f} s, "
        f"whole test {time.perf_counter() - started:.0f} s"
    )


def post(url: str, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> tuple[int, str]:
    """POST ``frame`` as dataframe_split (and ``params``); NaN and inf are sent as JSON's
    NaN/Infinity tokens, which MLflow's parser reads (null would do for NaN)."""
    request: dict[str, Any] = {"dataframe_split": frame.to_dict(orient="split", index=False)}
    if params is not None:
        request["params"] = params
    payload = json.dumps(request).encode()
    request = urllib.request.Request(url, payload, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
