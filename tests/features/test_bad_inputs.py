"""The bad-input corpus (tests/faults/bad_inputs/data): every file is refused with its fix, and
nothing is written."""

from pathlib import Path

import pytest

from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, plan_feature_set
from tests.features.conftest import Refuse

CORPUS = Path(__file__).resolve().parents[1] / "faults" / "bad_inputs" / "data"

EXPECTED = {
    "truncated.parquet": ["cannot read Parquet file", "truncated.parquet", "truncated or corrupt"],
    "latin1.csv": ["latin1.csv' is not UTF-8 text", "column 'name'", "save it again with UTF-8 encoding"],
    "semicolon.csv": [
        "semicolon.csv' seems to use ';' as its delimiter",
        "raylens reads comma-separated CSV",
    ],
    "types_differ": ["type of column 'x': int64 in 'a.csv' but string in 'b.csv'"],
    "inf_feature.csv": ["feature column 'a' has 3 rows that are infinite", "data.drop: [a]"],
    "nan_target.parquet": ["column 'target' has 2 missing values (null or NaN)", "drop those rows"],
    "duplicate_columns.csv": ["more than one column named 'x'", "rename the columns"],
    "single_class.csv": ["column 'target' has a single class"],
    "empty.csv": ["empty.csv' has no rows"],
    "tiny.csv": ["3 rows cannot be split into train/valid/test = 0.7/0.15/0.15"],
    "text_feature.csv": ["feature column 'color' has type string", "data.drop: [color]"],
}


def test_every_corpus_file_is_covered() -> None:
    assert sorted(p.name for p in CORPUS.iterdir() if p.name != "README.md") == sorted(EXPECTED)
    readme = (CORPUS / "README.md").read_text()
    assert all(f"`{name}" in readme for name in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_is_refused_before_anything_is_written(name: str, refuse: Refuse) -> None:
    source = str(CORPUS / name)
    before = sorted(CORPUS.rglob("*"))
    with pytest.raises(UserError) as caught:
        plan_feature_set("bad", DataConfig(source=source, target="target"), FeaturesConfig())
    for fragment in EXPECTED[name]:
        assert fragment in str(caught.value)
    assert sorted(CORPUS.rglob("*")) == before
    refuse(source, *EXPECTED[name])
