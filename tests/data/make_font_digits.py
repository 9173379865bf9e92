"""Make `tests/data/font_digits/`: digits that were not cut like MNIST's, to measure framing.

Each image is one digit drawn with a TrueType font at a random size and offset on a canvas
of random shape, with a thin or a thick pen, dark ink on light paper or light ink on a dark
ground, saved as PNG or JPEG. The label is the first character of the file name. Seeded, so
that running it again makes the same set:

    python tests/data/make_font_digits.py

The images are committed (320 files, 0.9 MB): fonts differ between machines, and
tests must not depend on what a machine has installed.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype")
FONTS = {  # short name -> file, from Debian's fonts-dejavu-core and fonts-liberation
    "sans": "dejavu/DejaVuSans.ttf",
    "sansbold": "dejavu/DejaVuSans-Bold.ttf",
    "serif": "dejavu/DejaVuSerif.ttf",
    "mono": "dejavu/DejaVuSansMono.ttf",
    "condensed": "dejavu/DejaVuSansCondensed-Oblique.ttf",
    "libserif": "liberation/LiberationSerif-Regular.ttf",
    "narrow": "liberation/LiberationSansNarrow-Italic.ttf",
    "libmono": "liberation/LiberationMono-Bold.ttf",
}
PENS = ("thin", "thick")
GROUNDS = ("light", "dark")
OUT = Path(__file__).parent / "font_digits"
SEED = 20261129


def draw_digit(rng: random.Random, digit: int, font_file: Path, pen: str,
               ground: str) -> Image.Image:
    size = rng.randint(20, 96)  # font size in pixels: a digit about 14 to 70 pixels tall
    font = ImageFont.truetype(str(font_file), size)
    stroke = 0 if pen == "thin" else max(1, size // 14)
    left, top, right, bottom = font.getbbox(str(digit), stroke_width=stroke)
    glyph_w, glyph_h = right - left, bottom - top
    # The canvas is anything from a snug crop to twice the digit and more, either way.
    width = rng.randint(glyph_w + 4, 2 * glyph_w + 32)
    height = rng.randint(glyph_h + 4, 2 * glyph_h + 32)
    x = rng.randint(2, width - glyph_w - 2) - left
    y = rng.randint(2, height - glyph_h - 2) - top
    if ground == "light":
        paper, ink = rng.randint(180, 255), rng.randint(0, 80)
    else:
        paper, ink = rng.randint(0, 60), rng.randint(170, 255)
    image = Image.new("L", (width, height), paper)
    ImageDraw.Draw(image).text((x, y), str(digit), fill=ink, font=font, stroke_width=stroke,
                               stroke_fill=ink)
    # Paper is not flat: a little sensor noise.
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 3, (height, width))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def main() -> None:
    rng = random.Random(SEED)
    OUT.mkdir(exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    for font_name, font_path in FONTS.items():
        for pen in PENS:
            for ground in GROUNDS:
                for digit in range(10):
                    image = draw_digit(rng, digit, FONT_DIR / font_path, pen, ground)
                    stem = f"{digit}_{font_name}_{pen}_{ground}"
                    if rng.random() < 0.5:
                        image.save(OUT / f"{stem}.png", optimize=True)
                    else:
                        image.save(OUT / f"{stem}.jpg", quality=rng.randint(60, 92))
    print(f"{len(list(OUT.iterdir()))} images in {OUT}")


if __name__ == "__main__":
    main()
