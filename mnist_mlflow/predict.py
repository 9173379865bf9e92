"""Image files -> digits with a logged or registered model (`models:/mnist-cnn@production`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError

from mnist_mlflow.config import UserError
from mnist_mlflow.mlrun import open_store

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


def load_image(path: Path) -> np.ndarray:
    """A PNG/JPEG of any size as MNIST sees it: (1, 28, 28) float32 in [0, 1], white on black."""
    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path}: not a readable image ({type(err).__name__})") from None
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    # A light background means dark ink on paper: invert to MNIST's white digit on black.
    if border.mean() > 0.5:
        pixels = 1.0 - pixels
    return pixels[np.newaxis]


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The model behind `model_uri`, on the CPU; UserError naming it when it cannot be loaded."""
    if model_uri.startswith(("models:/", "runs:/")):
        open_store()
    try:
        return mlflow.pyfunc.load_model(model_uri, model_config={"device": PREDICTION_DEVICE})
    except (MlflowException, OSError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load model {model_uri!r}: {first_line}") from None


def predict_files(model: mlflow.pyfunc.PyFuncModel, paths: Sequence[Path]) -> list[Prediction]:
    """One prediction per path, in order; unreadable files get an error, the rest a digit."""
    images: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for index, path in enumerate(paths):
        try:
            images[index] = load_image(path)
        except UserError as err:
            errors[index] = str(err)
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
