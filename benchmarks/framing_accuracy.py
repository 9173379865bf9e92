"""Accuracy on digits not cut like MNIST's: whole-frame resizing versus MNIST-style framing.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/framing_accuracy.py \
        [--experiment validated] [--images tests/data/font_digits] [--figure docs/img/framing.png]

For every trained group of the experiment (a configuration over its seeds), each seed's
logged model reads the shipped font digits (`tests/data/make_font_digits.py`: 8 fonts, thin
and thick pens, light and dark grounds, PNG and JPEG, random sizes and offsets) two ways:
the whole image resized to 28x28 (what `predict` did before framing) and `frame_digit`.
Both start from the same grey, white-on-black image, so the difference is the framing alone.
Prints accuracy per group as mean ± sd over seeds, then the production group's accuracy by
kind of image. `--figure` draws a few of the images as they are, resized whole, and framed,
with what the production model reads in each.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np
from tabulate import tabulate

from mnist_mlflow.framing import frame_digit, read_gray, resize_whole_frame, white_on_black
from mnist_mlflow.predict import DEFAULT_MODEL_URI, load_model
from mnist_mlflow.queries import find_runs
from mnist_mlflow.registry import PRODUCTION, logged_model_uri
from mnist_mlflow.schema import DEFAULT_MODEL_NAME
from mnist_mlflow.selection import group_runs
from mnist_mlflow.stats import Summary

IMAGES = Path(__file__).resolve().parent.parent / "tests" / "data" / "font_digits"
METHODS = {"whole-frame resize": resize_whole_frame, "MNIST framing": frame_digit}


def read_set(folder: Path) -> tuple[list[Path], np.ndarray, dict[str, np.ndarray]]:
    """The images, their labels, and each method's (N, 1, 28, 28) batch."""
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    labels = np.array([int(p.name[0]) for p in paths])
    grays = [white_on_black(read_gray(p)) for p in paths]
    batches = {name: np.stack([method(g) for g in grays])[:, np.newaxis].astype(np.float32)
               for name, method in METHODS.items()}
    return paths, labels, batches


def kinds(path: Path) -> list[str]:
    """What kind of image a file of the set is, from its name: `3_serif_thick_dark.jpg`."""
    _, font, pen, ground = path.stem.split("_")
    return [f"font {font}", f"{pen} pen", f"{ground} ground", path.suffix[1:].upper()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="validated")
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--figure", type=Path,
                        help="save the framing figure (docs/img/framing.png) here")
    args = parser.parse_args()

    paths, labels, batches = read_set(args.images)
    print(f"{len(paths)} images in {args.images}; tracking store {mlflow.get_tracking_uri()}")
    runs, _ = find_runs(args.experiment, "")
    experiment_id = mlflow.get_experiment_by_name(args.experiment).experiment_id
    production_run = mlflow.MlflowClient().get_model_version_by_alias(
        DEFAULT_MODEL_NAME, PRODUCTION).run_id
    rows, production_rows = [], None
    for group in group_runs(runs):
        accuracy: dict[str, list[float]] = defaultdict(list)
        correct_by_kind: dict[str, list[np.ndarray]] = defaultdict(list)
        for run in group.runs:
            model = load_model(logged_model_uri(run.run_id, experiment_id))
            for name, batch in batches.items():
                right = np.asarray(model.predict(batch)).argmax(axis=1) == labels
                accuracy[name].append(100 * right.mean())
                correct_by_kind[name].append(right)
        rows.append([group.name, group.n] + [Summary.of(accuracy[m]).format(1) for m in METHODS])
        if any(run.run_id == production_run for run in group.runs):
            production_rows = by_kind(paths, correct_by_kind)
            production_group = group.name
    print(tabulate(rows, headers=["group", "seeds", *METHODS], disable_numparse=True))
    if production_rows:
        print(f"\nproduction group {production_group}, by kind of image "
              "(accuracy %, mean over its seeds):")
        print(tabulate(production_rows, headers=["images", "count", *METHODS],
                       disable_numparse=True))
    if args.figure:
        draw_figure(args.figure, paths, batches, load_model(DEFAULT_MODEL_URI))
        print(f"\nfigure: {args.figure}")
    return 0


# Six that framing reads and resizing does not, and one thick pen that framing misreads.
FIGURE_FILES = ("2_serif_thick_light", "6_narrow_thin_dark", "5_mono_thin_light",
                "7_sans_thick_light", "4_sans_thick_light", "3_sans_thin_dark",
                "9_sansbold_thick_light")


def draw_figure(out: Path, paths: list[Path], batches: dict[str, np.ndarray],
                model: mlflow.pyfunc.PyFuncModel) -> None:
    """Inputs as given (top), resized whole (middle), framed as MNIST (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    chosen = [next(i for i, p in enumerate(paths) if p.stem == stem) for stem in FIGURE_FILES]
    fig, axes = plt.subplots(3, len(chosen), figsize=(1.6 * len(chosen), 5.4))
    for column, index in enumerate(chosen):
        with Image.open(paths[index]) as image:
            axes[0, column].imshow(image.convert("L"), cmap="gray", vmin=0, vmax=255)
        axes[0, column].set_title(paths[index].name, fontsize=6)
        for row, batch in enumerate(batches.values(), start=1):
            scores = np.asarray(model.predict(batch[index:index + 1]))[0]
            axes[row, column].imshow(batch[index, 0], cmap="gray", vmin=0, vmax=1)
            axes[row, column].set_title(f"reads {scores.argmax()} (p={scores.max():.2f})",
                                        fontsize=7)
    for row, label in enumerate(["input file", *METHODS]):
        axes[row, 0].set_ylabel(label, fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def by_kind(paths: list[Path], correct: dict[str, list[np.ndarray]]) -> list[list[str]]:
    """Per kind of image: the count and each method's accuracy, averaged over seeds."""
    members: dict[str, list[int]] = defaultdict(list)
    for index, path in enumerate(paths):
        for kind in kinds(path):
            members[kind].append(index)
    rows = []
    for kind in sorted(members):
        index = np.array(members[kind])
        rows.append([kind, len(index)] + [
            f"{100 * np.mean([right[index].mean() for right in correct[m]]):.1f}"
            for m in METHODS])
    return rows


if __name__ == "__main__":
    sys.exit(main())
