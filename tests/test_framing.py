"""MNIST-style framing of raw images, and files that are not what they claim to be."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mnist_mlflow.framing import (
    MAX_PIXELS,
    ImageRejected,
    expand_inputs,
    frame_digit,
    load_digit,
    read_gray,
    white_on_black,
)


def stroke_image(size: tuple[int, int], box: tuple[int, int, int, int], width: int,
                 ink: int = 0, paper: int = 255) -> Image.Image:
    """A "4" drawn in `box` of a `size` canvas."""
    image = Image.new("L", size, paper)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    x_stem, y_bar = x0 + 2 * (x1 - x0) // 3, y0 + 2 * (y1 - y0) // 3
    draw.line([(x0 + (x1 - x0) // 3, y0), (x0, y_bar), (x1, y_bar)], fill=ink, width=width)
    draw.line([(x_stem, y0), (x_stem, y1)], fill=ink, width=width)
    return image


def assert_framed_as_mnist(frame: np.ndarray) -> None:
    assert frame.shape == (28, 28) and frame.dtype == np.float32
    ink = frame > 0.05 * frame.max()
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert max(height, width) in (19, 20, 21) and max(height, width) <= 21
    ys, xs = np.indices(frame.shape)
    centre = ((ys * frame).sum() / frame.sum(), (xs * frame).sum() / frame.sum())
    assert abs(centre[0] - 14) <= 1 and abs(centre[1] - 14) <= 1, centre


@pytest.mark.parametrize(("case", "image"), [
    ("offset", stroke_image((300, 200), (200, 120, 280, 190), 6)),
    ("small", stroke_image((400, 400), (20, 20, 34, 40), 2)),
    ("large", stroke_image((600, 800), (10, 10, 590, 790), 40)),
    ("thick", stroke_image((100, 100), (20, 20, 80, 80), 18)),
    ("thin", stroke_image((500, 500), (100, 50, 400, 450), 1)),
    ("inverted", stroke_image((120, 90), (10, 10, 60, 80), 5, ink=255, paper=0)),
])
def test_the_ink_lands_as_mnist_places_it(tmp_path: Path, case: str,
                                          image: Image.Image) -> None:
    path = tmp_path / f"{case}.png"
    image.save(path)
    assert_framed_as_mnist(load_digit(path)[0])


FONT_DIGITS = Path(__file__).parent / "data" / "font_digits"


def test_every_shipped_font_digit_is_framed_as_mnist() -> None:
    """320 digits drawn with 8 fonts, two pens, on light and dark grounds, PNG and JPEG."""
    paths = sorted(FONT_DIGITS.iterdir())
    assert len(paths) == 320 and {p.suffix for p in paths} == {".png", ".jpg"}
    for path in paths:
        assert_framed_as_mnist(load_digit(path)[0])


def test_grain_on_the_paper_is_background_not_ink(tmp_path: Path) -> None:
    """A photo's grain must not widen the ink's bounding box to the whole image."""
    clean = stroke_image((240, 180), (150, 100, 200, 160), 5, ink=60, paper=200)
    grain = np.random.default_rng(0).normal(0, 4, (180, 240))
    noisy = np.clip(np.asarray(clean, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    clean.save(tmp_path / "clean.png")
    framed, reference = load_digit(tmp_path / "noisy.png")[0], load_digit(tmp_path / "clean.png")[0]
    assert_framed_as_mnist(framed)
    assert np.abs(framed - reference).mean() < 0.05


def test_transparent_and_16_bit_images_keep_their_ink(tmp_path: Path) -> None:
    # Black ink on a transparent background: a drawing app's usual PNG.
    ink = stroke_image((200, 200), (40, 40, 160, 170), 10, ink=255, paper=0)
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    rgba.putalpha(ink)
    rgba.save(tmp_path / "transparent.png")
    framed = load_digit(tmp_path / "transparent.png")[0]
    assert_framed_as_mnist(framed)
    # 16-bit grey, dark ink on light paper: not clipped to white.
    deep = (np.asarray(stroke_image((150, 150), (30, 30, 120, 130), 8), dtype=np.uint16)
            * 257).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert read_gray(tmp_path / "deep.png").min() < 0.01
    assert_framed_as_mnist(load_digit(tmp_path / "deep.png")[0])


def test_mnist_digits_come_out_framed_as_they_were(mnist_root: Path) -> None:
    from mnist_mlflow.data import load_mnist

    images, _ = load_mnist(mnist_root, test_limit=50).test_tensors()
    for image in images.numpy():
        pixels = image.astype(np.float32) / 255
        framed = frame_digit(white_on_black(pixels))
        assert_framed_as_mnist(framed)
        assert np.abs(framed - pixels).mean() < 0.005  # as they went in


def hostile_files(folder: Path) -> dict[str, str]:
    """Name -> what its error must say."""
    Image.new("L", (1, 1)).save(folder / "tiny.png")
    (folder / "bomb.png").write_bytes(_huge_png_header())
    good = io.BytesIO()
    stroke_image((64, 64), (10, 10, 50, 54), 4).save(good, "PNG")
    (folder / "truncated.png").write_bytes(good.getvalue()[:200])
    (folder / "text.png").write_text("not an image at all")
    (folder / "empty.png").write_bytes(b"")
    Image.new("L", (64, 64), 255).save(folder / "blank.png")
    (folder / "a-directory.png").mkdir()
    os.mkfifo(folder / "fifo.png")
    return {"bomb.png": f"too large: 400,000,000 pixels, the limit is {MAX_PIXELS:,}",
            "truncated.png": "truncated or corrupt", "text.png": "not an image",
            "empty.png": "empty file", "blank.png": "blank: no ink found",
            "a-directory.png": "a directory", "fifo.png": "not a regular file",
            "tiny.png": "blank: no ink found"}


def _huge_png_header() -> bytes:
    """A valid PNG header declaring 20,000 x 20,000 pixels (never decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_every_hostile_file_answers_for_itself(tmp_path: Path) -> None:
    for name, message in hostile_files(tmp_path).items():
        with pytest.raises(ImageRejected, match=message.replace("(", r"\(")):
            load_digit(tmp_path / name)


def test_directories_expand_to_their_images(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert expand_inputs([tmp_path, tmp_path / "empty"]) == [
        tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "empty"]


def test_mutated_images_never_escape_with_a_traceback(tmp_path: Path) -> None:
    good = io.BytesIO()
    stroke_image((48, 48), (8, 8, 40, 42), 4).save(good, "PNG")
    original = good.getvalue()
    rng = random.Random(20251129)
    for index in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"mutant{index}.png"
        path.write_bytes(bytes(data[:rng.randint(8, len(data))] if index % 3 == 0 else data))
        try:
            frame = load_digit(path)
        except ImageRejected:
            continue
        assert frame.shape == (1, 28, 28) and np.isfinite(frame).all()
