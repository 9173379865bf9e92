"""Figures: the per-run training curves (as in the seed's report) and the run comparison."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from mnist_mlflow.schema import EPOCH_METRICS, METRICS, THUMB_WIDTH, THUMBS_DIR  # noqa: E402

if TYPE_CHECKING:  # types only: `compare` plots without importing torch
    from mnist_mlflow.stats import Interval
    from mnist_mlflow.training import EpochMetrics


# Panels of the training curves: every per-epoch metric of these kinds, one line each.
CURVE_PANELS = (("loss", "Loss"), ("accuracy", "Accuracy (%)"))

# The UI shows a run's figures in its description as THUMB_WIDTH-pixel thumbnails (a click
# opens the whole). Every figure is drawn WIDTH inches wide, panels stacked rather than side
# by side, with no text under FONT points, so that its smallest text still reads at that
# size: FONT points at WIDTH inches is MIN_THUMB_TEXT_PX pixels or more once scaled down.
DPI = 100
WIDTH = 6.6
FONT = 10
MIN_THUMB_TEXT_PX = 9.0
# PNG text chunk in which each figure records its smallest text, in pixels of the thumbnail.
SMALLEST_TEXT_KEY = "Smallest text at thumbnail width (px)"


def smallest_text_px(fig: plt.Figure) -> float:
    """The smallest visible text of `fig`, in pixels, once the figure is THUMB_WIDTH wide."""
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text)
             if t.get_visible() and t.get_text().strip()]
    return min(sizes, default=FONT) / 72 * THUMB_WIDTH / fig.get_figwidth()


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={SMALLEST_TEXT_KEY: f"{smallest_text_px(fig):.1f}"})
    plt.close(fig)
    return path


def _wrapped(title: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def plot_training_curves(history: Sequence[EpochMetrics], path: Path, title: str) -> Path:
    """Loss and accuracy by epoch, one line per metric (train, test, ...), as named in
    schema.EPOCH_METRICS: a new per-epoch metric of those kinds appears by itself."""
    epochs = [m.epoch for m in history]
    measured = history[0].values if history else {}
    fig, axes = plt.subplots(len(CURVE_PANELS), 1, figsize=(WIDTH, 3.2 * len(CURVE_PANELS)),
                             sharex=True)
    for ax, (kind, label) in zip(axes, CURVE_PANELS, strict=True):
        for name, spec in EPOCH_METRICS.items():
            if spec.kind == kind and name in measured:
                ax.plot(epochs, [m.values[name] for m in history], marker="o", markersize=3,
                        label=spec.label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=FONT)
    axes[-1].set_xlabel("epoch")
    fig.suptitle(_wrapped(title))
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(histories: dict[str, dict[str, list[tuple[int, float]]]], path: Path,
                    title: str) -> Path:
    """Each plotted metric by epoch (one panel each), one line per run (keyed by its label)."""
    metrics = list(next(iter(histories.values()), {}))
    panels = [(metric, METRICS[metric].label if metric in METRICS else metric)
              for metric in metrics]
    legend_height = 0.22 * len(histories) + 0.3  # inches, below the panels
    height = 3.0 * len(panels) + legend_height + 0.5
    fig, axes = plt.subplots(len(panels), 1, figsize=(WIDTH, height), squeeze=False,
                             sharex=True)
    for ax, (metric, label) in zip(axes[:, 0], panels, strict=True):
        for run_label, metrics in histories.items():
            points = metrics.get(metric, [])
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3,
                    label=run_label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("epoch")
    # Below the panels: inside, the legend covered the first epochs of the curves.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=FONT, loc="lower center", ncol=1, frameon=False)
    fig.suptitle(_wrapped(title))
    fig.tight_layout(rect=(0, legend_height / height, 1, 1))
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[int, float]]) -> list[int]:
    """Indices of the non-dominated (parameters, accuracy) points, fewest parameters first:
    none other is as small and as accurate, and better in one."""
    front = []
    for i, (size, acc) in enumerate(points):
        dominated = any(s <= size and a >= acc and (s < size or a > acc)
                        for j, (s, a) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(groups: Sequence[tuple[str, int, Interval | None]], path: Path, title: str,
                named: int = 10) -> Path:
    """Test accuracy (group mean, 95% interval over seeds and images as error bars) against
    parameters (log scale), one point per group; the non-dominated groups joined by a line.
    The first `named` groups and the non-dominated ones are in the legend; the others are grey
    points (a search over hundreds of recipes would otherwise bury the plot under its
    legend). The accuracy axis ends at 100%, where accuracy does."""
    groups = [g for g in groups if g[2] is not None]
    fig, ax = plt.subplots(figsize=(WIDTH, 6.0 + 0.22 * min(len(groups), named + 2)))
    front = pareto_front([(size, found.mean) for _, size, found in groups])
    for index, (label, size, found) in enumerate(groups):
        error = None if found.low is None else [[found.mean - found.low],
                                                [min(found.high, 100.0) - found.mean]]
        if index < named or index in front:
            ax.errorbar([size], [found.mean], yerr=error, fmt="o", capsize=4,
                        label=f"{label}: {found.mean:.2f}")
        else:
            ax.errorbar([size], [found.mean], yerr=error, fmt="o", color="0.7",
                        markersize=3, elinewidth=0.5)
    ax.plot([groups[i][1] for i in front], [groups[i][2].mean for i in front], "k--",
            linewidth=1, label="non-dominated")
    low, high = ax.get_ylim()
    ax.set_ylim(low, min(high, 100.0))
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy, last epoch (%)")
    ax.grid(alpha=0.3, which="both")
    # Below the axes: group names are long, and inside they would hide the points.
    ax.legend(fontsize=FONT, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
    ax.set_title(_wrapped(title, 60), fontsize=FONT + 1)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(labels: np.ndarray, predicted: np.ndarray, path: Path, title: str) -> Path:
    """Counts of (true digit, answer) over the scored images; the diagonal is right, and
    every wrong cell is labelled with its count (a log colour scale keeps them visible)."""
    counts = np.zeros((10, 10), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    fig, ax = plt.subplots(figsize=(WIDTH, 5.9))
    image = ax.imshow(counts + 1, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(counts.max(), 1) + 1))
    for true, answer in zip(*np.nonzero(counts), strict=True):
        value = counts[true, answer]
        ax.text(answer, true, str(value), ha="center", va="center", fontsize=FONT,
                color="white" if true == answer else ("darkred" if value else "black"))
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("answer")
    ax.set_ylabel("true digit")
    wrong = int(counts.sum() - np.trace(counts))
    ax.set_title(f"{_wrapped(title, 60)}\n{wrong} of {counts.sum():,} images wrong",
                 fontsize=FONT + 1)
    fig.colorbar(image, ax=ax, label="images (log scale)", shrink=0.8)
    fig.tight_layout()
    return _save(fig, path)


def plot_gallery(images: np.ndarray, captions: Sequence[str], path: Path, title: str,
                 columns: int = 6) -> Path:
    """Digits (uint8, N x 28 x 28) in a grid, each with its caption above it: one mosaic in
    one axes (24 subplots cost every training run half a second)."""
    rows = max(1, -(-len(images) // columns))
    side, gap = images.shape[-1] if len(images) else 28, 16  # pixels; the caption's room
    mosaic = np.full((rows * (side + gap), columns * (side + 4)), 255, dtype=np.uint8)
    for index, image in enumerate(images):
        top, left = (index // columns) * (side + gap) + gap, (index % columns) * (side + 4) + 2
        mosaic[top:top + side, left:left + side] = image
    fig, ax = plt.subplots(figsize=(WIDTH, WIDTH / columns * 1.45 * rows + 0.9))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for index, caption in enumerate(captions[:len(images)]):
        ax.text((index % columns) * (side + 4) + 2 + side / 2,
                (index // columns) * (side + gap) + gap - 1.5, caption, ha="center",
                va="bottom", fontsize=FONT, linespacing=1.0)
    if not len(images):
        ax.text(mosaic.shape[1] / 2, mosaic.shape[0] / 2, "none", ha="center", fontsize=12)
    ax.axis("off")
    ax.set_title(_wrapped(title, 60), fontsize=FONT + 1)
    fig.tight_layout()
    return _save(fig, path)


def thumbnail(png: Path) -> Path:
    """A copy of figure `png`, THUMB_WIDTH pixels wide, in THUMBS_DIR beside it."""
    from PIL import Image  # matplotlib's own dependency

    small = png.parent / THUMBS_DIR / png.name
    small.parent.mkdir(exist_ok=True)
    with Image.open(png) as image:
        height = round(image.height * THUMB_WIDTH / image.width)
        image.resize((THUMB_WIDTH, height), Image.Resampling.LANCZOS).save(small)
    return small
