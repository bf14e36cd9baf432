"""The model zoo and user models.

A model is built by ``build_model(config, in_features, out_features)``. Built-in models take
their keyword arguments from ``model.params``; a user factory ``"package.module:function"`` is
called as ``function(in_features=..., out_features=..., **params)`` and returns an ``nn.Module``.
Models hold no distributed code: strategies wrap them from outside.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from raylens.errors import UserError, did_you_mean
from raylens.trainer.config import TorchModelConfig
from raylens.trainer.family import import_named

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


class MLP(nn.Module):
    """A feed-forward network: Linear → activation (→ dropout) per hidden layer, then a Linear head."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        act = _activation(activation)
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, int(size)), act()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(size)
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    @property
    def pipeline_split_points(self) -> list[str]:
        """Where a pipeline stage may begin: at each Linear after the first."""
        return [f"net.{i}" for i, layer in enumerate(self.net) if i > 0 and isinstance(layer, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """A small 1-D CNN for sequence-shaped features (each row is one channel of length in_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        act = _activation(activation)
        layers: list[nn.Module] = []
        width = 1
        for size in channels:
            layers += [nn.Conv1d(width, int(size), kernel_size, padding=kernel_size // 2), act()]
            width = int(size)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool1d(4), nn.Flatten())
        self.head = nn.Linear(width * 4, out_features)

    @property
    def pipeline_split_points(self) -> list[str]:
        """Where a pipeline stage may begin: at each convolution after the first, and the head."""
        convolutions = [f"features.{i}" for i, m in enumerate(self.features) if isinstance(m, nn.Conv1d)]
        return [*convolutions[1:], "head"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn1d": CNN1d}


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """The constructor behind a model name; ``UserError`` when it cannot be found."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, _, attr = name.partition(":")
    factory = import_named(name)
    if not callable(factory):
        raise UserError(f"model.name: '{module_name}' has no callable '{attr}'")
    return factory


def check_params(config: TorchModelConfig) -> None:
    """Fail early, naming the parameter, when ``model.params`` does not fit the constructor."""
    factory = resolve_factory(config.name)
    signature = inspect.signature(factory)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    known = [n for n in signature.parameters if n not in ("in_features", "out_features", "self")]
    for key in config.params:
        if not accepts_any and key not in known:
            raise UserError(
                f"model.params.{key}: '{config.name}' takes no parameter '{key}'{did_you_mean(key, known)}; "
                f"it takes: {', '.join(known) or 'none'}"
            )


def build_model(config: TorchModelConfig, in_features: int, out_features: int) -> nn.Module:
    factory = resolve_factory(config.name)
    try:
        model = factory(in_features=in_features, out_features=out_features, **config.params)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model: cannot build '{config.name}' with params {config.params}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.name: '{config.name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_model_runs(
    config: TorchModelConfig, rows: torch.Tensor, out_features: int, where: str = "model"
) -> None:
    """Build the model and run one forward pass on a few real rows, before any worker starts:
    a parameter the constructor takes but cannot use (``hidden: 64``) or a factory whose layers
    do not fit the data fails here, naming the key, instead of in every worker after retries."""
    model = build_model(config, rows.shape[1], out_features)
    try:
        with torch.no_grad():
            output = model.eval()(rows)
    except Exception as exc:  # anything the user's module raises on a batch
        raise UserError(
            f"{where}: '{config.name}' with params {config.params} fails on a batch of "
            f"{rows.shape[1]} features: {type(exc).__name__}: {exc}; fix {where}.params or the model"
        ) from None
    if output.ndim != 2 or output.shape[1] != out_features:
        raise UserError(
            f"{where}: '{config.name}' returns shape {tuple(output.shape)} for a batch of {rows.shape[0]} "
            f"rows; it must return (rows, {out_features}) for this task"
        )


@contextmanager
def importable_from(folders: Sequence[Path]) -> Iterator[None]:
    """User factories ("my_models:build") live beside the spec: the driver imports them from
    those folders, as Ray's workers do through PYTHONPATH. ``sys.path`` is restored after."""
    added = [str(f.resolve()) for f in folders if str(f.resolve()) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for entry in added:
            if entry in sys.path:
                sys.path.remove(entry)


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise UserError(
            f"model.params.activation: '{name}' is not one of "
            f"{', '.join(ACTIVATIONS)}{did_you_mean(name, ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]
