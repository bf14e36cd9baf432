"""Helpers for the feature tests: refusing bad input must leave the store untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from raylens.errors import UserError
from raylens.features import DataConfig, FeaturesConfig, build_feature_set

Refuse = Callable[..., str]


@pytest.fixture
def refuse(tmp_path: Path) -> Refuse:
    """``refuse(source, *fragments, **data)``: building ``source`` (relative to tmp_path) raises a
    UserError whose message holds every fragment, and writes no store folder. Returns the message."""

    def check(source: str, *fragments: str, **data: object) -> str:
        store = tmp_path / "store"
        config = DataConfig(source=source, **{"target": "target", **data})
        with pytest.raises(UserError) as caught:
            build_feature_set("d", config, FeaturesConfig(), store, tmp_path)
        message = str(caught.value)
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        assert not store.exists(), "a refused build wrote to the store"
        return message

    return check
