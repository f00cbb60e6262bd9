"""Generated phone photos: deterministic, photo-like JPEGs at phone sizes.

Phone photos are 12 MP JPEGs of 2-4 MB, often with an EXIF orientation tag. The load
tests used to send 640x480 JPEGs, which hide what decoding a real photo costs; these
images stand in for real ones (no data set to download). Their frequency content is
a photo's, so that the JPEG decoder's DCT scaling (``--decode fast``) meets what it
meets on real photos: smooth gradients (sky, walls, light), objects with sharp edges,
thin lines, texture at several scales (foliage, fabric) and a little sensor noise, all
drawn from a seeded generator.

    cliplora loadtest --images photos ...    # 4032x3024 and 3024x4032, quality 90,
                                             # half of them with an orientation tag
"""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, ImageDraw

PHONE_SIZE = (4032, 3024)  # 12 MP, 4:3, as most phone cameras store it
QUALITY = 90
DEFAULT_COUNT = 4


def photo_like(width: int, height: int, seed: int = 0, detail: float = 1.0) -> Image.Image:
    """An RGB image with a photo's frequency content; `detail` scales texture and noise
    (1.0 gives a 12 MP JPEG of about 2 MB at quality 90, 2.0 about 3.5 MB)."""
    rng = np.random.default_rng(seed)
    scene = _smooth_field(rng, width, height, (4, 3), "RGB")
    _draw_objects(ImageDraw.Draw(scene), rng, width, height)
    pixels = np.asarray(scene, dtype=np.float32)
    pixels += _texture(rng, width, height, detail)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _smooth_field(rng: np.random.Generator, width: int, height: int, cells: tuple[int, int], mode: str) -> Image.Image:
    """Random values on a coarse grid of `cells`, interpolated (bicubic) to the full size."""
    columns, rows = max(cells[0], 2), max(cells[1], 2)
    shape = (rows, columns, 3) if mode == "RGB" else (rows, columns)
    grid = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    return grid.resize((width, height), Image.Resampling.BICUBIC)


def _draw_objects(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """Sharp-edged discs and polygons, then thin lines (hair, wires, text strokes)."""
    side = min(width, height)
    for _ in range(12):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.3) * side
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((cx - radius, cy - radius * rng.uniform(0.4, 1), cx + radius, cy + radius), fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles], fill=colour)
    for _ in range(40):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        dx, dy = rng.normal(0, 0.15 * side, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line((x, y, x + dx, y + dy), fill=colour, width=max(1, int(rng.integers(1, 5)) * side // 3024))


def _texture(rng: np.random.Generator, width: int, height: int, detail: float) -> np.ndarray:
    """Luminance texture at three scales plus sensor noise, float32 [height, width]."""
    side = min(width, height)
    texture = np.zeros((height, width), np.float32)
    for per_side, amplitude in ((64, 18.0), (16, 12.0), (4, 8.0)):  # cells across the short side ~ feature size
        cells = max(side // per_side, 2)
        field = _smooth_field(rng, width, height, (cells * width // side, cells * height // side), "L")
        texture += (np.asarray(field, np.float32) - 127.5) * (amplitude * detail / 127.5)
    texture += rng.standard_normal((height, width), dtype=np.float32) * (2.5 * detail)
    return texture


def jpeg_bytes(image: Image.Image, *, orientation: int | None = None, quality: int = QUALITY) -> bytes:
    """`image` as a JPEG, with an EXIF orientation tag when `orientation` is given."""
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, "JPEG", quality=quality)
    else:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def phone_photos(count: int = DEFAULT_COUNT, seed: int = 0, size: tuple[int, int] | None = None) -> list[bytes]:
    """`count` phone photos: landscape and portrait (4032x3024, 3024x4032, or `size`) in
    turn, every other pair tagged with the orientation a phone writes for a turned camera
    (6 and 8), detail (and so file size, 2-3.5 MB at 12 MP) varied from photo to photo."""
    photos = []
    landscape_size = size or PHONE_SIZE
    for i in range(count):
        landscape = i % 2 == 0
        width, height = landscape_size if landscape else landscape_size[::-1]
        orientation = (6 if landscape else 8) if (i // 2) % 2 == 1 else None
        image = photo_like(width, height, seed=seed * 1000 + i, detail=1.0 + (i % 4) / 3)
        photos.append(jpeg_bytes(image, orientation=orientation))
    return photos
