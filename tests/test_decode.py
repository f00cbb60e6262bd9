"""``--decode fast`` and the EXIF orientation rule (cliplora.core.preprocess; README "Phone photos").

fast = exact, bit for bit, for every image too small for the decoder to scale; close to
exact (and not equal) for one that is scaled; the orientation tag turns a photo upright
as a person sees it, identically to Pillow's own ``exif_transpose``, unless told to
ignore it as open_clip does.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from numpy.testing import assert_array_equal  # imported at collection: its first import runs lscpu
from PIL import ExifTags, Image, ImageOps

from cliplora.core.errors import InvalidArgument
from cliplora.core.preprocess import (
    Decoding,
    clip_crop,
    dct_scale,
    decode_image,
    preprocess_bytes,
    transposed_box,
)
from cliplora.loadtest.photos import jpeg_bytes, phone_photos, photo_like

SIZE = 32  # a tiny model's input
FAST = Decoding("fast")
EXACT = Decoding("exact")
T = Image.Transpose

# What a camera stores for each orientation tag, given the upright picture (EXIF 2.3,
# tag 274), written out here rather than taken from the code under test: 6 is a phone
# turned clockwise, whose sensor rows run down the picture's right-hand side.
STORED_FROM_UPRIGHT = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
                       6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}


def tagged(image: Image.Image, orientation: int | None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    image.save(buffer, fmt, exif=exif.tobytes(), **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# At SIZE 32 and gap 3, a 4:3 image resizes to 42 x 32, so the decoder may scale it once it
# is at least 2 x (126 x 96) = 252 x 192 (hand-computed from the rule: README "Phone photos").
@pytest.mark.parametrize("width,height,fmt", [(17, 13, "JPEG"), (64, 48, "JPEG"), (251, 191, "JPEG"), (255, 191, "JPEG"),
                                              (191, 255, "JPEG"), (1000, 750, "PNG"), (1000, 750, "GIF")])
def test_fast_equals_exact_for_images_too_small_to_scale(width: int, height: int, fmt: str) -> None:
    data = tagged(photo_like(width, height, seed=width), None, fmt)
    assert dct_scale(data, SIZE, FAST) == 1
    assert_array_equal(preprocess_bytes(data, SIZE, decoding=FAST), preprocess_bytes(data, SIZE, decoding=EXACT))


def test_fast_scales_just_past_the_threshold_and_stays_close() -> None:
    """The comparison above can fail: one pixel row more and the decoder scales by 2."""
    data = tagged(photo_like(256, 192, seed=256), None, "JPEG")
    assert dct_scale(data, SIZE, FAST) == 2
    assert dct_scale(data, SIZE, EXACT) == 1
    fast, exact = (preprocess_bytes(data, SIZE, decoding=d).astype(int) for d in (FAST, EXACT))
    assert not np.array_equal(fast, exact)
    assert np.abs(fast - exact).mean() < 1.5 and np.abs(fast - exact).max() <= 12


def test_a_phone_photo_decodes_at_a_quarter_and_matches_exact_closely() -> None:
    """12 MP, tagged as a phone held upright: the decoder scales by 4 (298 x 224 x 3 =
    894 x 672 needed; 4032 / 4 = 1008), and the crop stays within JPEG noise of exact."""
    data = jpeg_bytes(photo_like(4032, 3024, seed=7), orientation=6)
    assert dct_scale(data, 224, FAST) == 4
    fast, exact = (preprocess_bytes(data, 224, decoding=d).astype(int) for d in (FAST, EXACT))
    difference = np.abs(fast - exact)
    assert difference.max() > 0, "fast decoded every pixel"
    assert difference.mean() < 0.5 and difference.max() <= 8


# 1000 x 761 scaled by 4 is 250 x 191 pixels, of which the image covers 250 x 190.25;
# turned clockwise (tag 6), the uncovered 0.75 pixel lands on the left edge. The full
# image resizes to 42 x 32 (32 x 1000 / 761 = 42.05); the scaled one alone would give 41.
@pytest.mark.parametrize("orientation,turn,box", [
    (None, None, (0, 0, 250, 190.25)),
    (6, T.ROTATE_270, (0.75, 0, 191, 250)),
])
def test_fast_is_the_scaled_decode_then_the_same_resize(orientation: int | None, turn: Image.Transpose | None,
                                                        box: tuple[float, ...]) -> None:
    """Bit for bit: Pillow's draft at 1/4, turned upright, resized with the covered box to
    the *full* image's target (42 x 32 turned 32 x 42), centre crop."""
    data = jpeg_bytes(photo_like(1000, 761, seed=11), orientation=orientation)
    image = Image.open(io.BytesIO(data))
    image.draft(None, (126, 96))
    image.load()
    assert image.size == (250, 191)
    if turn is not None:
        image = image.transpose(turn)
    target = (42, 32) if turn is None else (32, 42)
    resized = image.resize(target, Image.Resampling.BICUBIC, box=box)
    left, top = (5, 0) if turn is None else (0, 5)
    expected = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)))
    assert_array_equal(preprocess_bytes(data, SIZE, decoding=FAST), expected)
    assert not np.array_equal(preprocess_bytes(data, SIZE, decoding=EXACT), expected)


@pytest.mark.parametrize("orientation", list(STORED_FROM_UPRIGHT))
def test_orientation_tag_shows_the_photo_upright(orientation: int) -> None:
    upright = photo_like(60, 40, seed=orientation)
    method = STORED_FROM_UPRIGHT[orientation]
    stored = upright if method is None else upright.transpose(method)
    data = tagged(stored, orientation)
    assert_array_equal(preprocess_bytes(data, SIZE), clip_crop(upright, SIZE))  # the default: apply
    ignored = preprocess_bytes(data, SIZE, decoding=Decoding(orientation="ignore"))
    assert_array_equal(ignored, clip_crop(stored, SIZE))  # open_clip's pixels
    assert np.array_equal(ignored, clip_crop(upright, SIZE)) == (orientation == 1)
    assert decode_image(data).size == upright.size
    assert decode_image(data, orientation="ignore").size == stored.size


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("decoding", [EXACT, FAST], ids=["exact", "fast"])
def test_rotated_phone_jpeg_equals_pillows_exif_transpose(orientation: int, decoding: Decoding) -> None:
    """A rotated photo as a phone writes it (JPEG, tag in EXIF): the same pixels as Pillow's
    own exif_transpose followed by the resize; fast scales (by 4) and stays close."""
    data = jpeg_bytes(photo_like(1021, 767, seed=orientation), orientation=orientation)
    reference = clip_crop(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), SIZE).astype(int)
    ours = preprocess_bytes(data, SIZE, decoding=decoding).astype(int)
    if decoding is EXACT:
        assert_array_equal(ours, reference)
    else:
        assert dct_scale(data, SIZE, decoding) == 4
        assert np.abs(ours - reference).mean() < 1.5
    unturned = clip_crop(Image.open(io.BytesIO(data)), SIZE).astype(int)
    assert np.abs(ours - reference).mean() * 10 < np.abs(unturned - reference).mean()


@pytest.mark.parametrize("method", list(T))
def test_transposed_box_follows_the_pixels(method: Image.Transpose) -> None:
    """A white box on black, transposed: the box the function gives is exactly white."""
    image = Image.new("L", (7, 5), 0)
    box = (1, 0, 4, 3)
    image.paste(255, box)
    turned = np.asarray(image.transpose(method))
    left, top, right, bottom = (int(v) for v in transposed_box(box, image.size, method))
    assert (right - left) * (bottom - top) == 9
    assert (turned[top:bottom, left:right] == 255).all() and (turned == 255).sum() == 9


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "quick"}, "decode must be one of exact, fast"),
    ({"orientation": "rotate"}, "exif orientation must be one of apply, ignore"),
    ({"reducing_gap": 0.5}, "reducing gap must be at least 1"),
])
def test_bad_decoding_choices_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Decoding(**kwargs)


def test_phone_photos_are_phone_sized_jpegs_half_tagged() -> None:
    photos = phone_photos(4, seed=3, size=(64, 48))
    opened = [Image.open(io.BytesIO(p)) for p in photos]
    assert [im.format for im in opened] == ["JPEG"] * 4
    assert [im.size for im in opened] == [(64, 48), (48, 64)] * 2
    assert [im.getexif().get(ExifTags.Base.Orientation) for im in opened] == [None, None, 6, 8]
    assert phone_photos(4, seed=3, size=(64, 48)) == photos  # deterministic
    assert phone_photos(4, seed=4, size=(64, 48)) != photos
