"""Figures: the per-run training curves (as in the seed's report)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mnist_mlflow.training import EpochMetrics  # noqa: E402


def plot_training_curves(history: Sequence[EpochMetrics], path: Path, title: str) -> Path:
    """2x2 grid: train loss, test loss, train accuracy, test accuracy by epoch."""
    epochs = [m.epoch for m in history]
    panels = [("train_loss", "Training loss"), ("test_loss", "Test loss"),
              ("train_acc", "Training accuracy (%)"), ("test_acc", "Test accuracy (%)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (field, label) in zip(axes.flat, panels, strict=True):
        ax.plot(epochs, [getattr(m, field) for m in history], marker="o", markersize=3)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
