"""Raw image files as MNIST's digits were made, for anything that takes people's images.

LeCun et al. made MNIST's digits this way: the ink's bounding box scaled to fit 20x20 with its
aspect kept, then placed in 28x28 so that its centre of mass is the centre. A whole photo
resized to 28x28 looks nothing like that (a small digit in a corner stays small, in the
corner), so `frame_digit` does the same as MNIST, after turning any image into white ink on
black: alpha composited on the background it implies, 16-bit and palette images scaled to
[0, 1], polarity decided from the border.

Reading is bounded before any pixel is decoded: the file's size, then its declared pixel
count. Every failure is an `ImageRejected` naming what is wrong, never a decoder's traceback.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
from PIL import Image

# Larger than any photo or scan of a digit people take (a 50-megapixel phone photo is
# 8,192 x 6,144), and small enough that decoding one stays under ~200 MB as RGBA.
MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 100 * 1024 * 1024
IMAGE_SIZE, BOX = 28, 20
# Ink: pixels above this fraction of the brightest one, once the background is black. Low,
# so that MNIST's own anti-aliased edges count as ink (its test images come out as they went
# in: 500 of them, mean |difference| 5e-4 per pixel), and high enough that a JPEG's faint
# ringing around the strokes does not (at 0.05, 9 of the 320 font digits in tests/data were
# framed 16-18 pixels tall instead of 20).
INK_FRACTION = 0.1
# Background grain above the border's median by up to this many of its standard deviations
# is background: at 3, about 1 pixel in 700 of Gaussian grain is left, too faint for ink.
NOISE_SIGMAS = 3.0
# A frame whose brightest pixel is this close to its background holds no digit.
MIN_CONTRAST = 0.1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageRejected(Exception):
    """An input that is not a digit image we can read; the message says why."""


def check_file(path: Path) -> None:
    """ImageRejected unless `path` is a regular file of a readable size (a FIFO or device
    would block or never end; a directory is not an image)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageRejected("no such file") from None
    except OSError as err:
        raise ImageRejected(f"cannot be read ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageRejected("a directory, not an image")
    if not stat.S_ISREG(info.st_mode):
        raise ImageRejected("not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise ImageRejected(f"too large: {info.st_size:,} bytes, the limit is "
                            f"{MAX_FILE_BYTES:,}")
    if info.st_size == 0:
        raise ImageRejected("empty file")


def read_gray(path: Path) -> np.ndarray:
    """The file as (H, W) float32 in [0, 1]: transparency composited, 16-bit scaled."""
    check_file(path)
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:
        # PIL refuses, from the header, twice its own limit; say it in our words.
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageRejected(f"too large: {pixels}, the limit is {MAX_PIXELS:,} pixels") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageRejected(f"not an image ({type(err).__name__})") from None
    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageRejected(f"too large: {width * height:,} pixels ({width:,}x{height:,}), "
                                f"the limit is {MAX_PIXELS:,} pixels")
        try:
            image.load()
            return _to_gray(image)
        except Exception as err:  # decoders raise SyntaxError, ValueError, OSError, ...
            detail = str(err).splitlines()[0][:120] if str(err) else ""
            raise ImageRejected(f"truncated or corrupt ({type(err).__name__}"
                                f"{': ' + detail if detail else ''})") from None


def _to_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        # 16-bit PNGs open as "I": scale by the depth they were saved with.
        top = 65535.0 if pixels.max(initial=0) > 255 else 255.0
        return np.clip(pixels / top, 0.0, 1.0)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        luminance = np.asarray(rgba.convert("L"), dtype=np.float32) / 255.0
        return _composite(luminance, alpha)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _composite(luminance: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Transparent pixels become the background the opaque ones imply: dark ink (the usual
    drawing-app PNG) on white, light ink on black."""
    opaque = alpha > 0.5
    if not opaque.any() or opaque.all():
        return luminance * alpha + (1 - alpha) * (0.0 if opaque.all() else 1.0)
    ink_is_dark = float(np.median(luminance[opaque])) < 0.5
    background = 1.0 if ink_is_dark else 0.0
    return luminance * alpha + background * (1 - alpha)


def white_on_black(gray: np.ndarray) -> np.ndarray:
    """Ink white, background 0: inverted when the border is light (ink on paper).

    The background is the border's median plus its noise (NOISE_SIGMAS robust standard
    deviations, from the median absolute deviation): a photo's or scan's grain left above
    zero would count as ink far from the digit, and its bounding box would be the whole
    image. A clean image (MNIST's own) has no noise and loses nothing.
    """
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 0.5:
        gray = 1.0 - gray
        border = 1.0 - border
    level = float(np.median(border))
    noise = 1.4826 * float(np.median(np.abs(border - level)))
    return np.clip(gray - (level + NOISE_SIGMAS * noise), 0.0, None)


def frame_digit(gray: np.ndarray) -> np.ndarray:
    """MNIST-style (28, 28) float32 in [0, 1] from a white-on-black image of one digit: the
    ink's bounding box scaled to fit 20x20 (aspect kept), its centre of mass at the centre.
    ImageRejected when no ink is found."""
    top = float(gray.max(initial=0.0))
    if top < MIN_CONTRAST:
        raise ImageRejected("blank: no ink found")
    ink = gray >= INK_FRACTION * top
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] / top
    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Box filter when shrinking (each output pixel the mean of what it covers, as MNIST's
    # anti-aliasing), bilinear when enlarging a tiny digit.
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    boxed = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize(size, method))
    boxed = np.clip(boxed, 0.0, 1.0)
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    mass = boxed.sum()
    ys, xs = np.indices(boxed.shape)
    centre_y, centre_x = (ys * boxed).sum() / mass, (xs * boxed).sum() / mass
    # Integer shift so the centre of mass lands on pixel (14, 14), where MNIST's lie (their
    # centres of mass measure 14.0-14.4 in row and column), kept inside the frame.
    top_row = int(np.clip(round(IMAGE_SIZE / 2 - centre_y), 0, IMAGE_SIZE - boxed.shape[0]))
    left = int(np.clip(round(IMAGE_SIZE / 2 - centre_x), 0, IMAGE_SIZE - boxed.shape[1]))
    frame[top_row:top_row + boxed.shape[0], left:left + boxed.shape[1]] = boxed
    return frame


def resize_whole_frame(gray: np.ndarray) -> np.ndarray:
    """The whole white-on-black image squeezed to (28, 28), as `predict` read files before
    `frame_digit`: kept as the baseline that framing is measured against."""
    top = float(gray.max(initial=0.0)) or 1.0
    image = Image.fromarray((gray / top).astype(np.float32), mode="F")
    resized = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def load_digit(path: Path) -> np.ndarray:
    """A file as the model sees it: (1, 28, 28) float32, MNIST-framed; ImageRejected else."""
    return frame_digit(white_on_black(read_gray(path)))[np.newaxis]


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Paths as given, each directory replaced by its image files (by suffix, sorted; not
    recursive); a directory with none stays, and is answered as such."""
    expanded: list[Path] = []
    for path in paths:
        if path.is_dir():
            images = sorted(p for p in path.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            expanded += images or [path]
        else:
            expanded.append(path)
    return expanded
