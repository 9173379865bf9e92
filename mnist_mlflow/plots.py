"""Figures: the per-run training curves (as in the seed's report) and the run comparison."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:  # a type only: `compare` plots without importing torch
    from mnist_mlflow.training import EpochMetrics


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


def plot_comparison(histories: dict[str, dict[str, list[tuple[int, float]]]], path: Path,
                    title: str) -> Path:
    """Test accuracy and test loss by epoch, one line per run (keyed by its label)."""
    panels = [("test_acc", "Test accuracy (%)"), ("test_loss", "Test loss")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for run_label, metrics in histories.items():
            points = metrics.get(metric, [])
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3,
                    label=run_label)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
