"""The uint8 crop must equal open_clip's own eval transform, bit for bit."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cliplora.core.errors import InvalidArgument
from cliplora.core.preprocess import clip_crop, decode_image, preprocess_bytes, resized_size
from tests.factories import make_image

SIZES = [(224, 224), (225, 224), (224, 225), (300, 200), (200, 301), (1, 1), (17, 999), (640, 480), (1001, 333), (223, 224), (226, 226)]
MODES = ["RGB", "L", "RGBA", "LA", "P", "CMYK", "I", "F", "1"]


def open_clip_crop(image: Image.Image, size: int) -> np.ndarray:
    """open_clip's eval transform with identity normalisation, back to uint8."""
    transform = open_clip.image_transform(size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    tensor = transform(image)
    restored = torch.round(tensor * 255).to(torch.uint8)
    assert torch.equal(restored.float() / 255, tensor), "ToTensor values are k/255 exactly"
    return restored.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width,height", SIZES)
def test_crop_is_bit_exact_with_open_clip(mode: str, width: int, height: int) -> None:
    image = make_image(width, height, mode, seed=width * 7 + height)
    ours = clip_crop(image, 224)
    assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3)
    np.testing.assert_array_equal(ours, open_clip_crop(image, 224))


def test_crop_differs_for_a_different_filter() -> None:
    """The comparison above can fail: bilinear resampling gives other pixels."""
    image = make_image(640, 480, seed=1)
    bilinear = np.asarray(image.resize((298, 224), Image.Resampling.BILINEAR).crop((37, 0, 261, 224)))
    assert not np.array_equal(clip_crop(image, 224), bilinear)


def test_resized_size_truncates_like_torchvision() -> None:
    assert resized_size(640, 480, 224) == (298, 224)  # 224 * 640 / 480 = 298.67 -> 298
    assert resized_size(333, 1001, 224) == (224, 673)  # 673.3 -> 673


def test_decode_formats_and_animated_gif_first_frame() -> None:
    image = make_image(50, 40, seed=3)
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        assert preprocess_bytes(buffer.getvalue(), 32).shape == (32, 32, 3)
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    crop = preprocess_bytes(buffer.getvalue(), 16)
    assert crop[..., 0].min() > 200 and crop[..., 2].max() < 50  # red, the first frame


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"not an image at all", "not a decodable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not a decodable image"),
    ],
)
def test_garbage_is_invalid_argument(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        decode_image(data)


def test_truncated_jpeg_is_invalid_argument() -> None:
    buffer = io.BytesIO()
    make_image(200, 200, seed=4).save(buffer, "JPEG")
    with pytest.raises(InvalidArgument, match="truncated|corrupt|decodable"):
        decode_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, "PNG")
    with pytest.raises(InvalidArgument, match="too large"):
        decode_image(buffer.getvalue(), max_pixels=1_000_000)


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="aspect ratio"):
        clip_crop(Image.new("RGB", (1, 60000)), 224, max_pixels=50_000_000)
