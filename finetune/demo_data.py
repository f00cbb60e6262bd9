"""A labelled image set made on the spot: coloured shapes, one folder per colour.

For trying `cliplora finetune` → `export` → `serve` → `evaluate` end to end without
downloading a data set, and for the tests. Each image is a noisy grey background with
one disc or square of the class colour (jittered), at a random place and size.

    python -m cliplora.finetune.demo_data demo-data/shapes --per-class 40
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 210), "yellow": (220, 200, 30)}


def shape_image(colour: tuple[int, int, int], rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.fromarray(rng.integers(90, 166, size=(height, width, 3), dtype=np.uint8), "RGB")
    side = int(rng.integers(min(size) // 3, min(size) * 2 // 3))
    left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, rng.integers(-25, 26, size=3), strict=True))
    draw = ImageDraw.Draw(image)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((left, top, left + side, top + side), fill=fill)
    return image


def write_shapes(root: Path, per_class: int, *, seed: int = 0, size: tuple[int, int] = (48, 40)) -> Path:
    """`per_class` PNG images per colour under ``root/<colour>/``; returns `root`."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(colour, rng, size).save(folder / f"{i:03d}.png")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("WIDTH", "HEIGHT"))
    args = parser.parse_args(argv)
    write_shapes(args.output, args.per_class, seed=args.seed, size=tuple(args.size))
    print(f"{args.per_class * len(COLOURS)} images in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
