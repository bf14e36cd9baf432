"""Package exports imported on first use (PEP 562).

``from raylens.trainer import ModelConfig`` must not import torch, nor ``from raylens.features
import DataConfig`` pyarrow: validating a spec answers in a fraction of a second only if reading
the configs imports nothing heavy. Each package lists its exports once, by module; the type
checker sees the same names through an ``if TYPE_CHECKING`` import block, and
``tests/test_layering.py`` checks that the two lists agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``, exporting each name of ``exports[module]``
    from ``module``; the module is imported when one of its names is first asked for."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home[name]), name)

    return __getattr__, sorted(home)
