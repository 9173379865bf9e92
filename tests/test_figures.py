"""Every figure a description shows reads at the size the UI shows it: a 440-pixel thumbnail.

Each figure is drawn by the package's own plotting code from data shaped as a run's, then
scaled down as the UI's thumbnail is; its smallest text, measured on the figure's own text
objects when it was drawn, must still be 9 pixels or more there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_mlflow.plots import (
    MIN_THUMB_TEXT_PX,
    SMALLEST_TEXT_KEY,
    plot_comparison,
    plot_confusion,
    plot_gallery,
    plot_pareto,
    plot_training_curves,
    thumbnail,
)
from mnist_mlflow.schema import THUMB_WIDTH
from mnist_mlflow.stats import Interval
from mnist_mlflow.training import EpochMetrics

RNG = np.random.default_rng(0)
GROUP = "gap8k-dropout0 epochs=15 lr=0.05 scheduler=onecycle (n = 3)"


def history() -> list[EpochMetrics]:
    return [EpochMetrics(epoch, {"train_loss": 1 / epoch, "train_acc": 99 - 5 / epoch,
                                 "val_loss": 1.1 / epoch, "val_acc": 98.9 - 5 / epoch,
                                 "test_loss": 1.2 / epoch, "test_acc": 98.8 - 5 / epoch,
                                 "lr": 0.01, "epoch_seconds": 11.0})
            for epoch in range(1, 16)]


def curves(path: Path) -> Path:
    return plot_training_curves(history(), path, "s1 gap8k d0.05 e15 lr0.05 onecycle #2")


def comparison(path: Path) -> Path:
    series = {f"{GROUP} {k}": {"val_acc": [(e, 99 - k / e) for e in range(1, 16)],
                               "test_acc": [(e, 98.9 - k / e) for e in range(1, 16)],
                               "test_loss": [(e, 0.1 * k / e) for e in range(1, 16)]}
              for k in range(5)}
    return plot_comparison(series, path, "mnist-optimization: 5 of 12 groups, mean over seeds")


def pareto(path: Path) -> Path:
    return plot_pareto([(f"{GROUP} {k}", 4000 + 700 * k, Interval(3, 99.2 + k / 20, 99.1,
                                                                  99.3 + k / 20))
                        for k in range(12)], path,
                       "mnist-optimization: test accuracy against size, one point per group")


def confusion(path: Path) -> Path:
    labels = RNG.integers(0, 10, 10_000)
    predicted = np.where(RNG.random(10_000) < 0.99, labels, RNG.integers(0, 10, 10_000))
    return plot_confusion(labels, predicted, path, "s1 gap8k d0.05 e15, validation images, "
                          "last epoch")


def mistakes(path: Path) -> Path:
    images = RNG.integers(0, 256, (24, 28, 28), dtype=np.uint8)
    captions = [f"#{49_000 + k}\n{k % 10} → {(k + 3) % 10} p 0.99" for k in range(24)]
    return plot_gallery(images, captions, path, "s1 gap8k d0.05 e15, validation images, last "
                        "epoch: the 24 most confident mistakes (image row: true → answer, "
                        "probability)")


@pytest.mark.parametrize("draw", [curves, comparison, pareto, confusion, mistakes],
                         ids=lambda draw: draw.__name__)
def test_each_figure_reads_at_the_thumbnail_size_the_ui_shows(draw, tmp_path: Path) -> None:
    small = thumbnail(draw(tmp_path / "figure.png"))
    with Image.open(tmp_path / "figure.png") as full, Image.open(small) as shown:
        assert shown.width == THUMB_WIDTH
        # Not a sliver: a thumbnail as tall as a page of panels would be read by scrolling.
        assert shown.height <= 2.5 * THUMB_WIDTH
        smallest = float(full.text[SMALLEST_TEXT_KEY])
    assert smallest >= MIN_THUMB_TEXT_PX, f"{draw.__name__}: smallest text {smallest:.1f} px"
