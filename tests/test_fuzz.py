"""Fuzzing the decode path and whole requests (a stand-in Triton, then the real one): every
input ends in a clean status, never INTERNAL; the success path is fuzzed as well."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cliplora.core.errors import InvalidArgument
from cliplora.core.preprocess import clip_crop, decode_image
from cliplora.serve.stack.processes import stop_process
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc
from tests import factories
from tests.fakes import Aborted, FakeContext, service
from tests.serving import encoded, free_port, png_header

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


def _image(draw, size: int) -> pb.Image:
    """One image, valid or not: encoded bytes of any kind, or raw RGB of any size."""
    if draw(st.booleans()):
        return pb.Image(encoded=draw(image_bytes()))
    w, h = draw(st.integers(0, 20)), draw(st.integers(0, 20))
    if draw(st.booleans()):  # the right byte count for the claimed size
        return pb.Image(raw=pb.RawImage(rgb=draw(st.binary(min_size=w * h * 3, max_size=w * h * 3)), width=w, height=h))
    return pb.Image(raw=pb.RawImage(rgb=draw(st.binary(max_size=1300)), width=w, height=h))


def _valid_image(draw, size: int) -> pb.Image:
    if draw(st.booleans()):
        return pb.Image(encoded=draw(st.sampled_from(SEEDS)))
    return pb.Image(raw=pb.RawImage(rgb=draw(st.binary(min_size=size * size * 3, max_size=size * size * 3)),
                                    width=size, height=size))


@st.composite
def requests(draw, models: tuple[str, ...] = ("m",), versions: tuple[int, ...] = (0, 1, 2), size: int = 16,
             max_images: int = 4) -> pb.ClassifyRequest:
    """About half of the draws are valid requests (so the success path is fuzzed too); the
    rest vary every field: model name text, any int64 version, 0-5 images of any kind, any top_k."""
    if draw(st.booleans()):
        event("draw: valid request")
        fields = {"model": draw(st.sampled_from(models)), "version": draw(st.sampled_from(versions)),
                  "images": [_valid_image(draw, size) for _ in range(draw(st.integers(1, max_images)))]}
        if draw(st.booleans()):
            fields["top_k"] = draw(st.integers(0, 8))
        return pb.ClassifyRequest(**fields)
    event("draw: anything")
    fields = {
        "model": draw(st.one_of(st.sampled_from(models), st.text(max_size=80))),
        "version": draw(st.one_of(st.sampled_from(versions), st.integers(-(2**63), 2**63 - 1))),
        "images": [_image(draw, size) for _ in range(draw(st.integers(0, max_images + 1)))],
    }
    if draw(st.booleans()):
        fields["top_k"] = draw(st.integers(-(2**31), 2**31 - 1))
    return pb.ClassifyRequest(**fields)


CLEAN = {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}


def test_whole_requests_end_in_a_clean_status() -> None:
    """Against the servicer with a stand-in Triton: every request ends OK or in a status of
    the error table (never INTERNAL), the slot is released, and the run saw both OK replies
    and refusals (so neither path went untested)."""
    seen: Counter[str] = Counter()

    @FUZZ
    @given(request=requests())
    def one(request: pb.ClassifyRequest) -> None:
        svc = service(max_images=4, max_image_bytes=4096, max_pixels=4_000_000)

        async def call() -> str:
            try:
                reply = await svc.Classify(request, FakeContext())
            except Aborted as exc:
                return exc.code.name
            assert len(reply.results) == len(request.images)
            return "OK"

        code = asyncio.run(call())
        event(f"status: {code}")
        seen[code] += 1
        assert code in CLEAN, (code, request)
        assert svc.admission.in_flight == 0

    one()
    print(f"\nwhole requests, stand-in Triton: {dict(seen)}")
    assert seen["OK"] >= 50 and sum(n for code, n in seen.items() if code != "OK") >= 50, seen


@pytest.fixture(scope="module")
def served(tiny_triton, tmp_path_factory):
    """The session's real Triton and the gateway as its own process (`cliplora serve --triton-url`)."""
    from tests.serving import wait_for_health

    logs = tmp_path_factory.mktemp("fuzz-gateway")
    port = free_port()
    command = [str(Path(sys.executable).with_name("cliplora")), "serve", "--triton-url", tiny_triton.grpc_url,
               "--grpc-port", str(port), "--metrics-port", "-1", "--http-port", "0", "--max-images", "4", "--max-image-bytes", "4096"]
    with open(logs / "gateway.log", "wb") as log:
        gateway = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        asyncio.run(wait_for_health(port, "SERVING", timeout_s=60))
        yield port
    finally:
        stop_process(gateway, 20)


def test_whole_requests_against_the_real_triton(served: int) -> None:
    """A smaller budget through the real gateway process, its real Triton client and error
    mapping, and Triton itself: never INTERNAL, and both OK replies and refusals occur."""
    seen: Counter[str] = Counter()
    channel = grpc.insecure_channel(f"127.0.0.1:{served}")
    stub = pb_grpc.ClassifierStub(channel)
    try:
        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
        @given(request=requests(models=("base", "lora"), versions=(0, 1), size=factories.IMAGE_SIZE))
        def one(request: pb.ClassifyRequest) -> None:
            try:
                reply = stub.Classify(request, timeout=30)
                code = "OK"
                assert len(reply.results) == len(request.images)
            except grpc.RpcError as exc:
                code = exc.code().name
            event(f"status: {code}")
            seen[code] += 1
            assert code in CLEAN, (code, request)

        one()
    finally:
        channel.close()
    print(f"\nwhole requests, real Triton: {dict(seen)}")
    assert seen["OK"] >= 10 and sum(n for code, n in seen.items() if code != "OK") >= 10, seen
