"""Image files -> digits with a logged or registered model (`models:/mnist-cnn@production`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from mnist_mlflow.config import UserError
from mnist_mlflow.framing import ImageRejected, load_digit
from mnist_mlflow.store import model_files_gone, open_store

DEFAULT_MODEL_URI = "models:/mnist-cnn@production"
# Logged models are torch.export (pt2) programs with their weights on the CPU, which cannot
# move to another device; MLflow would pick CUDA wherever it is present and refuse to load
# them. A 5-7k-parameter network predicts fast enough on the CPU.
PREDICTION_DEVICE = "cpu"


@dataclass(frozen=True)
class Prediction:
    """The digit and its probability for one file, or why the file could not be read."""

    path: Path
    digit: int = -1
    probability: float = 0.0
    error: str = ""

    def as_json(self) -> dict[str, object]:
        if self.error:
            return {"file": str(self.path), "error": self.error.removeprefix(f"{self.path}: ")}
        return {"file": str(self.path), "digit": self.digit,
                "probability": round(self.probability, 6)}


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The model behind `model_uri`, on the CPU; UserError naming it when it cannot be loaded."""
    if model_uri.startswith(("models:/", "runs:/")):
        open_store(writes=False)
    try:
        return mlflow.pyfunc.load_model(model_uri, model_config={"device": PREDICTION_DEVICE})
    except (MlflowException, OSError) as err:
        if model_files_gone(model_uri):  # MLflow says only "No such artifact: ''"
            raise UserError(f"its model files are gone ({model_uri})") from None
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load model {model_uri!r}: {first_line}") from None


def predict_files(model: mlflow.pyfunc.PyFuncModel, paths: Sequence[Path]) -> list[Prediction]:
    """One prediction per path, in order; unreadable files get an error, the rest a digit."""
    images: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for index, path in enumerate(paths):
        try:
            images[index] = load_digit(path)
        except ImageRejected as err:
            errors[index] = f"{path}: {err}"
    probabilities = {}
    if images:
        batch = np.stack(list(images.values()))
        scores = np.asarray(model.predict(batch))
        probabilities = dict(zip(images, scores, strict=True))
    results = []
    for index, path in enumerate(paths):
        if index in errors:
            results.append(Prediction(path, error=errors[index]))
        else:
            scores = probabilities[index]
            digit = int(np.argmax(scores))
            results.append(Prediction(path, digit, float(scores[digit])))
    return results
