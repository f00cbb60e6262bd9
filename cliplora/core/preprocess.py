"""Image decoding and CLIP preprocessing up to the uint8 crop.

The model graph takes the uint8 crop (see `cliplora.core.contract`); everything before it
happens here, for `cliplora predict`, `evaluate`, `finetune`, the gateway and the
exporter's verification alike. The steps reproduce open_clip's / OpenAI CLIP's eval
transform exactly (``Resize(size, BICUBIC)`` on a PIL image, ``CenterCrop(size)``, then
``convert("RGB")``) without importing torch or torchvision, so the gateway stays light:

- the short side becomes ``size`` and the long side ``int(size * long / short)``
  (truncated, as torchvision does), resampled by PIL's antialiased bicubic filter;
- the crop offsets are ``int(round((side - size) / 2.0))`` (Python's round);
- the mode conversion to RGB comes *after* resize and crop, as in open_clip, so
  palette, alpha, grayscale and CMYK images give the very same pixels as there.

Two choices sit before those steps (`Decoding`; the ``--decode`` and
``--exif-orientation`` flags):

- ``exact`` decodes every pixel; ``fast`` lets the JPEG decoder scale down by 1/2, 1/4
  or 1/8 in the DCT domain (Pillow's ``draft``), to no less than `REDUCING_GAP` times
  the resize target, then resizes to the *same* target (computed from the full size,
  with Pillow's box for the part of the last scaled pixel that lies outside the image),
  crops and converts as ``exact``. An image too small to be scaled by 2 at that gap (or
  not a JPEG) is decoded exactly as in ``exact``.
- The EXIF orientation tag is applied (``apply``: the photo as a person sees it) before
  the resize, in every command alike; ``ignore`` keeps the stored pixel order, as
  open_clip does (it never reads the tag).

The tests check bit-exact equality with open_clip's own transform on many sizes and
modes (``exact``), the orientation rule with rotated photos, and fast = exact for images
too small to scale.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from cliplora.core.errors import InvalidArgument, NotFound, PermissionDenied

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest decoded image accepted (width x height), and largest intermediate resize.
A 50 MP photo is accepted; a 60000 x 60000 "decompression bomb" header is not."""

DECODE_MODES = ("exact", "fast")
ORIENTATIONS = ("apply", "ignore")
REDUCING_GAP = 3.0
"""``fast`` decodes to at least this many times the resize target on each side: the gap
Pillow documents as indistinguishable from a fair resize in most cases, and the one
the gate chose (README, "Phone photos": at most 0.011 logits at logit scale 100)."""
DEFAULT_DECODE = "fast"
"""Chosen by the gate (README, "Phone photos"): every top-1 kept, every logit within 0.05."""

Box = tuple[float, float, float, float]

# EXIF orientation (TIFF tag 274) -> the transposition that shows the photo upright.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS_AXES = {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
              Image.Transpose.ROTATE_270}


@dataclass(frozen=True)
class Decoding:
    """How encoded bytes become pixels: ``--decode`` and ``--exif-orientation``."""

    mode: str = DEFAULT_DECODE
    orientation: str = "apply"
    reducing_gap: float = REDUCING_GAP

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise InvalidArgument(f"decode must be one of {', '.join(DECODE_MODES)}, got {self.mode!r}")
        if self.orientation not in ORIENTATIONS:
            raise InvalidArgument(f"exif orientation must be one of {', '.join(ORIENTATIONS)}, got {self.orientation!r}")
        if not math.isfinite(self.reducing_gap) or self.reducing_gap < 1:
            raise InvalidArgument(f"reducing gap must be at least 1, got {self.reducing_gap}")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only; refuse what is not an image or claims too many pixels."""
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
    return image


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(f"image too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Truncated or corrupt data: Pillow raises OSError("image file is truncated ...").
        raise InvalidArgument(f"corrupt or truncated image ({exc})") from None


def _draft(image: Image.Image, size: int, reducing_gap: float) -> Box | None:
    """Ask the JPEG decoder for a DCT-scaled image no smaller than `reducing_gap` times the
    resize target; returns the full image's box in the scaled pixels, or None when the
    image is decoded in full (not a JPEG, or too small to be scaled by 2)."""
    width, height = image.size
    target_width, target_height = resized_size(width, height, size)
    wanted = (math.ceil(target_width * reducing_gap), math.ceil(target_height * reducing_gap))
    if width // wanted[0] < 2 or height // wanted[1] < 2:
        return None
    drafted = image.draft(None, wanted)  # None for formats without DCT scaling
    return None if drafted is None else drafted[1]


def dct_scale(data: bytes, size: int, decoding: Decoding) -> int:
    """By how much the JPEG decoder scales this image down under `decoding` (1: every
    pixel decoded). Reads the header only."""
    image = _open(data, DEFAULT_MAX_PIXELS)
    width = image.size[0]
    if decoding.mode != "fast" or _draft(image, size, decoding.reducing_gap) is None:
        return 1
    return round(width / image.size[0])


def exif_transpose_method(image: Image.Image) -> Image.Transpose | None:
    """The transposition the image's EXIF orientation asks for; None when upright or
    untagged (a missing, unreadable or out-of-range tag counts as upright, as in Pillow)."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None


def transposed_box(box: Box, size: tuple[int, int], method: Image.Transpose) -> Box:
    """Where `box` of an image of `size` lies after the image is transposed by `method`."""
    width, height = size
    x0, y0, x1, y1 = box
    corners = {
        Image.Transpose.FLIP_LEFT_RIGHT: ((width - x1, y0), (width - x0, y1)),
        Image.Transpose.FLIP_TOP_BOTTOM: ((x0, height - y1), (x1, height - y0)),
        Image.Transpose.ROTATE_180: ((width - x1, height - y1), (width - x0, height - y0)),
        Image.Transpose.ROTATE_90: ((y0, width - x1), (y1, width - x0)),  # counter-clockwise
        Image.Transpose.ROTATE_270: ((height - y1, x0), (height - y0, x1)),  # clockwise
        Image.Transpose.TRANSPOSE: ((y0, x0), (y1, x1)),
        Image.Transpose.TRANSVERSE: ((height - y1, width - x1), (height - y0, width - x0)),
    }[method]
    (left, top), (right, bottom) = corners
    return (left, top, right, bottom)


@dataclass
class _Decoded:
    """A loaded image, upright when asked, with the full image's size (before any DCT
    scaling) and, when scaled, the full image's box in its pixels."""

    image: Image.Image
    full_size: tuple[int, int]
    box: Box | None = None


def _decode(data: bytes, size: int | None, decoding: Decoding, max_pixels: int) -> _Decoded:
    image = _open(data, max_pixels)
    decoded = _Decoded(image, image.size)
    if decoding.mode == "fast" and size is not None:
        decoded.box = _draft(image, size, decoding.reducing_gap)
    _load(image)
    if decoding.orientation == "apply":
        _upright(decoded)
    return decoded


def _upright(decoded: _Decoded) -> None:
    method = exif_transpose_method(decoded.image)
    if method is None:
        return
    if decoded.box is not None:
        decoded.box = transposed_box(decoded.box, decoded.image.size, method)
    if method in SWAPS_AXES:
        decoded.full_size = (decoded.full_size[1], decoded.full_size[0])
    try:
        decoded.image = decoded.image.transpose(method)
    except (ValueError, OSError) as exc:
        raise InvalidArgument(f"cannot turn the {decoded.image.mode} image upright: {exc}") from None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, orientation: str = "apply") -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, BMP, GIF, ...) into a loaded PIL image,
    every pixel, upright unless `orientation` is ``ignore``.

    The header is checked against `max_pixels` *before* the pixels are decoded, so a
    small file that claims a huge size costs nothing. Animated images give their first
    frame. Raises `InvalidArgument` for anything that is not a complete, sane image.
    """
    return _decode(data, None, Decoding(orientation=orientation), max_pixels).image


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


def read_image_file(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, orientation: str = "apply") -> Image.Image:
    """Read and decode an image file (every pixel, upright unless told otherwise); errors name the file."""
    data = read_image_bytes(path)
    try:
        return decode_image(data, max_pixels=max_pixels, orientation=orientation)
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
    return _resize_crop(_Decoded(image, image.size), size, max_pixels)


def _resize_crop(decoded: _Decoded, size: int, max_pixels: int) -> np.ndarray:
    """`clip_crop` of the full image; a DCT-scaled one is resized to the full image's target."""
    image = decoded.image
    width, height = decoded.full_size
    new_width, new_height = resized_size(width, height, size)
    if new_width * new_height > max_pixels:
        # A 1 x 60000 strip would be resized to 224 x 13 million pixels.
        raise InvalidArgument(
            f"image aspect ratio too extreme: {width}x{height} would be resized to "
            f"{new_width}x{new_height}"
        )
    try:
        if decoded.box is not None or (new_width, new_height) != image.size:
            image = image.resize((new_width, new_height), Image.Resampling.BICUBIC, box=decoded.box)
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


def preprocess_bytes(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                     decoding: Decoding = Decoding()) -> np.ndarray:
    """Encoded image bytes -> the model's uint8 input for one image."""
    return _resize_crop(_decode(data, size, decoding, max_pixels), size, max_pixels)


def preprocess_file(path: str | Path, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                    decoding: Decoding = Decoding()) -> np.ndarray:
    """An image file -> the model's uint8 input for one image; errors name the file."""
    data = read_image_bytes(path)
    try:
        return preprocess_bytes(data, size, max_pixels=max_pixels, decoding=decoding)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{path}: {exc}") from None
