"""MNIST's idx files read with numpy alone: the images at given rows, for pictures drawn where
torch is not loaded (`compare`'s gallery of disagreements). Training reads MNIST through
torchvision (data.py), which verifies the files first.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IMAGE_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IMAGES_MAGIC = 2051  # idx3, unsigned bytes
HEADER_BYTES = 16
SIDE = 28


def read_images(raw_dir: Path, split: str) -> np.ndarray:
    """All images of MNIST's `split` ("train" or "test") as uint8 (N, 28, 28): the extracted
    file, else its .gz; OSError or ValueError when neither is there and whole."""
    path = raw_dir / IMAGE_FILES[split]
    if path.is_file():
        content = path.read_bytes()
    else:
        with gzip.open(path.with_name(path.name + ".gz")) as archive:
            content = archive.read()
    header = np.frombuffer(content[:HEADER_BYTES], dtype=">i4")
    if len(header) != 4 or header[0] != IMAGES_MAGIC or tuple(header[2:]) != (SIDE, SIDE):
        raise ValueError(f"{path} is not an MNIST images file (header {header.tolist()})")
    count = int(header[1])
    pixels = np.frombuffer(content, dtype=np.uint8, offset=HEADER_BYTES)
    if len(pixels) != count * SIDE * SIDE:
        raise ValueError(f"{path} holds {len(pixels)} pixels, not {count} images")
    return pixels.reshape(count, SIDE, SIDE)
