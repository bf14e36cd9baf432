"""The model artifact: an MLflow pyfunc model that takes the raw feature columns a user has.

It holds the trained weights, the model's constructor and the fitted feature transforms, so the
transform a served model applies is the one fitted at training time, byte for byte. Loading it
needs torch, pandas, MLflow and raylens, nothing from the training run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext

from raylens.features import FeatureSet, apply_all, transforms_from_dicts
from raylens.trainer.config import ModelConfig
from raylens.trainer.loop import TaskSpec, predict
from raylens.trainer.models import build_model

WEIGHTS = "weights"
SPEC = "spec"


def write_model_files(
    folder: Path,
    model_state: dict[str, torch.Tensor],
    model_config: ModelConfig,
    task: TaskSpec,
    feature_set: FeatureSet,
) -> dict[str, str]:
    """Write the weights and everything needed to rebuild the model; return pyfunc artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model_state, folder / "weights.pt")
    spec = {
        "model": model_config.model_dump(),
        "task": asdict(task),
        "feature_columns": feature_set.feature_columns,
        "classes": feature_set.classes,
        "transforms": feature_set.manifest["transforms"],
        "feature_set": {"name": feature_set.name, "version": feature_set.version},
    }
    (folder / "model_spec.json").write_text(json.dumps(spec, indent=2))
    return {WEIGHTS: str(folder / "weights.pt"), SPEC: str(folder / "model_spec.json")}


class TabularTorchModel(PythonModel):
    """Raw feature columns in, predictions out (class labels, or values in the target's units)."""

    def load_context(self, context: PythonModelContext) -> None:
        spec = json.loads(Path(context.artifacts[SPEC]).read_text())
        self.feature_columns: list[str] = spec["feature_columns"]
        self.classes: list[Any] | None = spec["classes"]
        self.task = TaskSpec(**spec["task"])
        self.transforms = transforms_from_dicts(spec["transforms"])
        model = build_model(ModelConfig(**spec["model"]), len(self.feature_columns), self.task.out_features)
        model.load_state_dict(torch.load(context.artifacts[WEIGHTS], map_location="cpu", weights_only=True))
        self.model = model.eval()

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in self.feature_columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"input is missing feature columns: {', '.join(missing)}; the model takes "
                f"{len(self.feature_columns)} columns: {', '.join(self.feature_columns[:10])}..."
            )
        x = frame[self.feature_columns].to_numpy(dtype=np.float32)
        x = apply_all(self.transforms, x, self.feature_columns)
        output = predict(self.model, torch.from_numpy(x), self.task)
        if self.classes is not None:
            return np.asarray(self.classes)[output]
        return output
