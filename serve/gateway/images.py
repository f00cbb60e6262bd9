"""Images to the model's input, off the event loop.

Each image of a request is decoded, resized and centre-cropped (`cliplora.core.preprocess`,
open_clip's preprocessing, with the gateway's ``--decode`` and ``--exif-orientation``) or,
sent raw, checked to be the model's size, in the gateway's thread pool
(`cliplora.serve.gateway.decode_pool`, one thread per core by default): Pillow releases
the GIL while it decodes, so the pool's threads run side by side while the event loop
keeps answering. Each image's time goes into ``cliplora_gateway_preprocess_duration_seconds``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cliplora.core import contract
from cliplora.core.errors import InvalidArgument
from cliplora.core.preprocess import Decoding, preprocess_bytes
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.v1 import classifier_pb2 as pb


class ImagePreparer:
    def __init__(self, pool: ThreadPoolExecutor, metrics: GatewayMetrics, max_pixels: int,
                 decoding: Decoding = Decoding()) -> None:
        self.pool = pool
        self.metrics = metrics
        self.max_pixels = max_pixels
        self.decoding = decoding

    async def batch(self, images: Sequence[pb.Image], image_size: int) -> np.ndarray:
        """[N, S, S, 3] uint8, one row per image, in order; InvalidArgument naming the image."""
        loop = asyncio.get_running_loop()
        crops = await asyncio.gather(*(
            loop.run_in_executor(self.pool, self.prepare, index, image, image_size)
            for index, image in enumerate(images)
        ))
        return np.stack(crops)

    def prepare(self, index: int, image: pb.Image, image_size: int) -> np.ndarray:
        """One image to the model's uint8 input; runs in the thread pool."""
        started = time.perf_counter()
        try:
            if image.WhichOneof("data") == "raw":
                return raw_pixels(image.raw, image_size)
            return preprocess_bytes(image.encoded, image_size, max_pixels=self.max_pixels, decoding=self.decoding)
        except InvalidArgument as exc:
            raise InvalidArgument(f"image {index}: {exc}") from None
        finally:
            self.metrics.preprocess.observe(time.perf_counter() - started)


def raw_pixels(raw: pb.RawImage, image_size: int) -> np.ndarray:
    """Raw RGB bytes as [S, S, 3]: they must already be the model's size."""
    if raw.width != image_size or raw.height != image_size:
        raise InvalidArgument(f"raw images must be {image_size}x{image_size} for this model, got {raw.width}x{raw.height}")
    expected = raw.width * raw.height * contract.CHANNELS
    if len(raw.rgb) != expected:
        raise InvalidArgument(f"raw RGB needs {expected} bytes, got {len(raw.rgb)}")
    return np.frombuffer(raw.rgb, dtype=np.uint8).reshape(raw.height, raw.width, contract.CHANNELS)
