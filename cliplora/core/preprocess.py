"""Image decoding and CLIP preprocessing up to the uint8 crop.

The model graph takes the uint8 crop (see `cliplora.core.contract`); everything before it
happens here, for `cliplora predict`, the gateway and the exporter's verification
alike. The steps reproduce open_clip's / OpenAI CLIP's eval transform exactly
(``Resize(size, BICUBIC)`` on a PIL image, ``CenterCrop(size)``, then ``convert("RGB")``)
without importing torch or torchvision, so the gateway stays light:

- the short side becomes ``size`` and the long side ``int(size * long / short)``
  (truncated, as torchvision does), resampled by PIL's antialiased bicubic filter;
- the crop offsets are ``int(round((side - size) / 2.0))`` (Python's round);
- the mode conversion to RGB comes *after* resize and crop, as in open_clip, so
  palette, alpha, grayscale and CMYK images give the very same pixels as there.

EXIF orientation is not applied, as in open_clip. The tests check bit-exact equality
with open_clip's own transform on many sizes and modes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cliplora.core.errors import InvalidArgument, NotFound, PermissionDenied

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest decoded image accepted (width x height), and largest intermediate resize.
A 50 MP photo is accepted; a 60000 x 60000 "decompression bomb" header is not."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, BMP, GIF, ...) into a loaded PIL image.

    The header is checked against `max_pixels` *before* the pixels are decoded, so a
    small file that claims a huge size costs nothing. Animated images give their first
    frame. Raises `InvalidArgument` for anything that is not a complete, sane image.
    """
    if not data:
        raise InvalidArgument("empty image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(f"image too large: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidArgument(f"not a decodable image ({type(exc).__name__})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidArgument(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidArgument(
            f"image too large: {width}x{height} = {width * height} pixels, "
            f"limit {max_pixels}"
        )
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(f"image too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Truncated or corrupt data: Pillow raises OSError("image file is truncated ...").
        raise InvalidArgument(f"corrupt or truncated image ({exc})") from None
    return image


def read_image_bytes(path: str | Path) -> bytes:
    """An image file's bytes, with errors that name the file and carry a status code."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidArgument(f"not an image file but a folder: {path}") from None
    except PermissionError:
        raise PermissionDenied(f"cannot read image file: {path}") from None


def read_image_file(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode an image file; errors name the file."""
    data = read_image_bytes(path)
    try:
        return decode_image(data, max_pixels=max_pixels)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{path}: {exc}") from None


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: short side = size."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def clip_crop(image: Image.Image, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Resize the short side to `size` (bicubic), centre-crop `size` x `size`, convert to RGB.

    Returns a C-contiguous uint8 array of shape ``[size, size, 3]``, the model's input.
    """
    width, height = image.size
    new_width, new_height = resized_size(width, height, size)
    if new_width * new_height > max_pixels:
        # A 1 x 60000 strip would be resized to 224 x 13 million pixels.
        raise InvalidArgument(
            f"image aspect ratio too extreme: {width}x{height} would be resized to "
            f"{new_width}x{new_height}"
        )
    try:
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        left = int(round((new_width - size) / 2.0))
        top = int(round((new_height - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        if image.mode != "RGB":
            image = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidArgument(f"cannot preprocess {image.mode} image: {exc}") from None
    array = np.asarray(image, dtype=np.uint8)
    if array.shape != (size, size, 3):
        raise InvalidArgument(f"unexpected preprocessed shape {array.shape} from a {image.mode} image")
    return np.ascontiguousarray(array)


def preprocess_bytes(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> the model's uint8 input for one image."""
    return clip_crop(decode_image(data, max_pixels=max_pixels), size, max_pixels=max_pixels)


def preprocess_file(path: str | Path, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image file -> the model's uint8 input for one image; errors name the file."""
    image = read_image_file(path, max_pixels=max_pixels)
    try:
        return clip_crop(image, size, max_pixels=max_pixels)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{path}: {exc}") from None
