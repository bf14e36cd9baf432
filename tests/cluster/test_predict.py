"""``raylens predict``: a registered model over a folder of files, in batches, into one output
file with labels and class probabilities; bad input refused with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raylens.cluster.cli import app
from raylens.cluster.predict import predict_files
from tests.trainer.test_artifacts import Logged, cancer_models


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """A binary classifier (scikit-learn's breast cancer data) registered as models:/cancer/1."""
    return cancer_models(tmp_path_factory.mktemp("cancer"), "cancer", epochs=(3,))[0]


def predict(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["predict", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_a_folder_is_scored_in_batches_with_labels_and_probabilities(cancer: Logged, tmp_path: Path) -> None:
    rows = cancer.raw_test.assign(id=[f"patient-{i}" for i in range(len(cancer.raw_test))])
    data = tmp_path / "incoming"
    (data / "day2").mkdir(parents=True)
    half = len(rows) // 2
    rows.iloc[:half].to_parquet(data / "day1.parquet")
    rows.iloc[half:].to_parquet(data / "day2" / "part.parquet")
    out = tmp_path / "scores.parquet"

    code, output = predict(
        cancer.model_uri, str(data), "--out", str(out), "--keep", "id",
        "--tracking-uri", cancer.tracking_uri, "--batch-rows", "7",
    )  # fmt: skip
    assert code == 0, output
    assert f"{len(rows)} rows" in output
    scores = pq.read_table(out).to_pandas()
    assert list(scores.columns) == ["id", "prediction", "probability_0", "probability_1"]
    assert scores["id"].tolist() == rows["id"].tolist()  # every row, in the files' order
    assert (scores["prediction"].to_numpy() == cancer.expected).all()
    probabilities = scores[["probability_0", "probability_1"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities.argmax(axis=1) == scores["prediction"].to_numpy()).all()


def test_a_csv_is_scored_into_a_csv(cancer: Logged, tmp_path: Path) -> None:
    cancer.raw_test.to_csv(tmp_path / "rows.csv", index=False)
    out = tmp_path / "scores.csv"
    code, output = predict(
        cancer.model_uri, str(tmp_path / "rows.csv"), "-o", str(out), "--tracking-uri", cancer.tracking_uri
    )
    assert code == 0, output
    scores = pd.read_csv(out)
    assert (scores["prediction"].to_numpy() == cancer.expected).all()


def test_bad_rows_are_named_by_file_and_row_and_nothing_is_written(cancer: Logged, tmp_path: Path) -> None:
    data = tmp_path / "incoming"
    data.mkdir()
    rows = cancer.raw_test.copy()
    rows.iloc[:20].to_csv(data / "a.csv", index=False)
    bad = rows.iloc[20:].reset_index(drop=True)
    bad.loc[13, "mean radius"] = np.nan
    bad.to_csv(data / "b.csv", index=False)
    out = tmp_path / "scores.parquet"

    code, output = predict(
        cancer.model_uri,
        str(data),
        "--out",
        str(out),
        "--tracking-uri",
        cancer.tracking_uri,
        "--batch-rows",
        "5",
    )
    assert code == 2
    message = " ".join(output.split())
    assert "file 'b.csv'" in message and "column 'mean radius' row [13] (NaN)" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incoming"]  # no output, no partial file


def test_mistakes_in_the_command_are_refused(cancer: Logged, tmp_path: Path) -> None:
    cancer.raw_test.to_csv(tmp_path / "rows.csv", index=False)
    data, uri = str(tmp_path / "rows.csv"), cancer.tracking_uri
    (tmp_path / "taken.csv").write_text("keep me\n")
    out = ["--out", str(tmp_path / "o.csv")]
    cases = [
        ([cancer.model_uri, data, "--out", str(tmp_path / "x.json")], "must end in .csv or .parquet"),
        ([cancer.model_uri, data, "--out", str(tmp_path / "taken.csv")], "--overwrite"),
        ([cancer.model_uri, str(tmp_path / "none"), *out], "does not exist"),
        (["models:/cancer/9", data, *out], "cannot load 'models:/cancer/9'"),
        ([cancer.model_uri, data, *out, "--keep", "idd"], "has no column 'idd'"),
    ]
    for args, message in cases:
        code, output = predict(*args, "--tracking-uri", uri)
        assert code == 2 and message in " ".join(output.split()), output
    assert (tmp_path / "taken.csv").read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "taken.csv"]


@pytest.mark.usefixtures("ray_cluster")
def test_ray_data_actors_score_the_same_rows_in_the_same_order(cancer: Logged, tmp_path: Path) -> None:
    rows = cancer.raw_test.assign(id=range(len(cancer.raw_test)))
    data = tmp_path / "incoming"
    data.mkdir()
    third = len(rows) // 3
    for part, start in enumerate((0, third, 2 * third)):
        rows.iloc[start : start + third if part < 2 else None].to_parquet(data / f"part-{part}.parquet")
    here = predict_files(
        cancer.model_uri,
        data,
        tmp_path / "here.parquet",
        tracking_uri=cancer.tracking_uri,
        keep=["id"],
        workers=1,
    )
    on_ray = predict_files(
        cancer.model_uri, data, tmp_path / "ray.parquet", tracking_uri=cancer.tracking_uri,
        keep=["id"], workers=2, batch_rows=16,
    )  # fmt: skip
    assert here.rows == on_ray.rows == len(rows)
    expected, got = pq.read_table(here.out).to_pandas(), pq.read_table(on_ray.out).to_pandas()
    assert got["id"].tolist() == expected["id"].tolist() == rows["id"].tolist()
    assert (got["prediction"] == expected["prediction"]).all()
    # Another batch size takes other float paths through the network: equal to float32's precision.
    np.testing.assert_allclose(got["probability_1"], expected["probability_1"], rtol=1e-5, atol=1e-7)


def test_an_actor_returns_an_input_error_as_a_value(cancer: Logged) -> None:
    """What a Ray Data actor does with a bad batch (no Ray: the actor's function called here): the
    message comes back as the batch's one column, for the driver to raise (Ray would bury an
    exception's message in a traceback of its own)."""
    import pyarrow as pa

    from raylens.cluster.predict import INPUT_ERROR, _Scorer

    scorer = _Scorer(cancer.model_uri, cancer.tracking_uri, (), True)
    good = pa.Table.from_pandas(cancer.raw_test.iloc[:4], preserve_index=False)
    assert scorer(good).column_names == ["prediction", "probability_0", "probability_1"]
    bad = cancer.raw_test.iloc[:8].reset_index(drop=True)
    bad.loc[5, "mean texture"] = np.inf
    refused = scorer(pa.Table.from_pandas(bad, preserve_index=False))
    assert refused.column_names == [INPUT_ERROR]
    assert "column 'mean texture' row [5] (inf)" in refused.column(INPUT_ERROR)[0].as_py()
