"""Fuzzing the decode path and whole requests: every input ends in a clean status, never INTERNAL."""

from __future__ import annotations

import asyncio

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cliplora.core.errors import InvalidArgument
from cliplora.core.preprocess import clip_crop, decode_image
from cliplora.v1 import classifier_pb2 as pb
from tests import factories
from tests.fakes import Aborted, FakeContext, service
from tests.serving import encoded, png_header

SEEDS = [encoded(factories.make_image(37, 23, mode, seed=i), fmt)
         for i, (mode, fmt) in enumerate([("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("L", "BMP"), ("RGB", "WEBP")])]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def image_bytes(draw) -> bytes:
    """Random bytes, or a valid image truncated / bit-flipped / with a lying header."""
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "bomb", "valid"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "bomb":
        return png_header(draw(st.integers(1, 70000)), draw(st.integers(1, 70000)))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    if kind == "truncated":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "flipped":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@FUZZ
@given(data=image_bytes(), size=st.sampled_from([16, 32]))
def test_decode_and_crop_only_ever_raise_invalid_argument(data: bytes, size: int) -> None:
    try:
        crop = clip_crop(decode_image(data, max_pixels=4_000_000), size, max_pixels=4_000_000)
    except InvalidArgument:
        return
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8


@st.composite
def requests(draw) -> pb.ClassifyRequest:
    images = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            images.append(pb.Image(encoded=draw(image_bytes())))
        else:
            w, h = draw(st.integers(0, 20)), draw(st.integers(0, 20))
            images.append(pb.Image(raw=pb.RawImage(rgb=draw(st.binary(max_size=1300)), width=w, height=h)))
    fields = {
        "model": draw(st.one_of(st.just("m"), st.text(max_size=80))),
        "version": draw(st.one_of(st.just(0), st.integers(-(2**63), 2**63 - 1))),
        "images": images,
    }
    if draw(st.booleans()):
        fields["top_k"] = draw(st.integers(-(2**31), 2**31 - 1))
    return pb.ClassifyRequest(**fields)


@FUZZ
@given(request=requests())
def test_whole_requests_end_in_a_clean_status(request: pb.ClassifyRequest) -> None:
    svc = service(max_images=4, max_image_bytes=4096, max_pixels=4_000_000)

    async def call() -> str:
        try:
            reply = await svc.Classify(request, FakeContext())
        except Aborted as exc:
            return exc.code.name
        assert len(reply.results) == len(request.images)
        return "OK"

    code = asyncio.run(call())
    assert code in {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}, (code, request)
    assert svc.in_flight == 0

