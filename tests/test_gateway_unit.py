"""The gateway's servicer in process, with a stand-in for Triton: validation, errors, limits."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from cliplora.core.errors import Unavailable
from cliplora.serve.gateway.errors import to_status
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.v1 import classifier_pb2 as pb
from tests.fakes import Aborted, FakeContext, FakeTriton, image_bytes, service
from tests.images import png_header


async def test_classify_ranks_and_scores() -> None:
    triton = FakeTriton()
    reply = await service(triton).Classify(
        pb.ClassifyRequest(model="m", images=[pb.Image(encoded=image_bytes())], top_k=2), FakeContext())
    assert reply.model == "m" and reply.version == 2  # latest
    (result,) = reply.results
    assert [p.label for p in result.predictions] == ["b", "a"]
    assert result.predictions[0].logit - result.predictions[1].logit == pytest.approx(1.0)
    assert triton.batches[0].shape == (1, 16, 16, 3) and triton.batches[0].dtype == np.uint8


async def test_default_top_k_and_all_classes() -> None:
    svc = service()
    default = await svc.Classify(pb.ClassifyRequest(model="m", images=[pb.Image(encoded=image_bytes())]), FakeContext())
    assert len(default.results[0].predictions) == 3  # 5 by default, capped by the class count
    everything = await svc.Classify(pb.ClassifyRequest(model="m", images=[pb.Image(encoded=image_bytes())], top_k=0),
                                    FakeContext())
    assert sum(p.score for p in everything.results[0].predictions) == pytest.approx(1.0)


async def test_raw_rgb_equals_encoded_path() -> None:
    from cliplora.core.preprocess import preprocess_bytes

    data = image_bytes(3)
    crop = preprocess_bytes(data, 16)
    svc = service()
    a = await svc.Classify(pb.ClassifyRequest(model="m", images=[pb.Image(encoded=data)], top_k=0), FakeContext())
    b = await svc.Classify(pb.ClassifyRequest(
        model="m", images=[pb.Image(raw=pb.RawImage(rgb=crop.tobytes(), width=16, height=16))], top_k=0), FakeContext())
    assert a.results == b.results


@pytest.mark.parametrize(
    "request_kwargs,code,message",
    [
        (dict(model="m", images=[]), "INVALID_ARGUMENT", "send 1 to 4 images"),
        (dict(model="m", images=[pb.Image(encoded=b"x")] * 5), "INVALID_ARGUMENT", "send 1 to 4 images"),
        (dict(model="m", images=[pb.Image()]), "INVALID_ARGUMENT", "image 0 is empty"),
        (dict(model="m", images=[pb.Image(encoded=b"garbage")]), "INVALID_ARGUMENT", "image 0: not a decodable image"),
        (dict(model="m", images=[pb.Image(encoded=png_header(60000, 60000))]), "INVALID_ARGUMENT", "too large"),
        (dict(model="m", images=[pb.Image(encoded=b"\xff" * 2000)]), "INVALID_ARGUMENT", "2000 bytes; the limit is 1000"),
        (dict(model="m", images=[pb.Image(encoded=b"x")], top_k=-1), "INVALID_ARGUMENT", "top_k must be"),
        (dict(model="../m", images=[pb.Image(encoded=b"x")]), "INVALID_ARGUMENT", "invalid model name"),
        (dict(model="x" * 10000, images=[pb.Image(encoded=b"x")]), "INVALID_ARGUMENT", "invalid model name"),
        (dict(model="m", version=-3, images=[pb.Image(encoded=b"x")]), "INVALID_ARGUMENT", "version must be"),
        (dict(model="other", images=[pb.Image(encoded=b"x")]), "NOT_FOUND", "model 'other' not found"),
        (dict(model="m", version=7, images=[pb.Image(encoded=b"x")]), "NOT_FOUND", "no ready version 7"),
        (dict(model="m", images=[pb.Image(raw=pb.RawImage(rgb=b"\0" * 12, width=2, height=2))]), "INVALID_ARGUMENT",
         "raw images must be 16x16"),
        (dict(model="m", images=[pb.Image(raw=pb.RawImage(rgb=b"\0" * 10, width=16, height=16))]), "INVALID_ARGUMENT",
         "image 0: raw RGB needs 768 bytes"),
    ],
)
async def test_error_table_for_bad_requests(request_kwargs, code, message) -> None:
    with pytest.raises(Aborted) as caught:
        await service(max_images=4, max_image_bytes=1000, max_pixels=1_000_000).Classify(
            pb.ClassifyRequest(**request_kwargs), FakeContext())
    assert caught.value.code.name == code and message in caught.value.details
    assert caught.value.details.count("image 0") <= 1, caught.value.details  # said once, not "image 0: image 0: ..."


async def test_triton_down_and_internal_errors() -> None:
    with pytest.raises(Aborted) as caught:
        await service(FakeTriton(fail=Unavailable("Triton is unavailable: connection refused"))).Classify(
            pb.ClassifyRequest(model="m", images=[pb.Image(encoded=image_bytes())]), FakeContext())
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(Aborted) as caught:
        await service(FakeTriton(fail=RuntimeError("secret detail /etc/passwd"))).Classify(
            pb.ClassifyRequest(model="m", images=[pb.Image(encoded=image_bytes())]), FakeContext())
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.details and "incident" in caught.value.details


async def test_deadline_on_arrival() -> None:
    with pytest.raises(Aborted) as caught:
        await service().Classify(pb.ClassifyRequest(model="m", images=[pb.Image(encoded=image_bytes())]),
                                 FakeContext(remaining=-0.5))
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_over_the_concurrency_limit_is_resource_exhausted_at_once() -> None:
    """Six calls at once, room for two: four RESOURCE_EXHAUSTED, each answered before the
    fake Triton's one-second delay could have passed for anyone (no queue), two OK."""
    delay_s = 1.0
    svc = service(FakeTriton(delay=delay_s), max_concurrent=2)
    request = pb.ClassifyRequest(model="m", images=[pb.Image(encoded=image_bytes())])
    loop = asyncio.get_running_loop()

    async def call() -> tuple[str, float]:
        try:
            await svc.Classify(request, FakeContext())
            return "OK", loop.time()
        except Aborted as exc:
            return exc.code.name, loop.time()

    started = loop.time()
    outcomes = await asyncio.gather(*(call() for _ in range(6)))
    codes = sorted(code for code, _ in outcomes)
    assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    rejected = [at - started for code, at in outcomes if code == "RESOURCE_EXHAUSTED"]
    answered = [at - started for code, at in outcomes if code == "OK"]
    assert min(answered) >= delay_s  # the admitted ones waited for "Triton"
    assert max(rejected) < min(answered) and max(rejected) < delay_s / 2  # the refused ones did not
    assert svc.admission.in_flight == 0
    assert svc.metrics.rejected._value.get() == 4


async def test_metrics_count_requests_by_code() -> None:
    svc = service()
    await svc.Classify(pb.ClassifyRequest(model="m", images=[pb.Image(encoded=image_bytes())] * 2), FakeContext())
    with pytest.raises(Aborted):
        await svc.Classify(pb.ClassifyRequest(model="nope", images=[pb.Image(encoded=b"x")]), FakeContext())
    registry = svc.metrics.registry
    assert registry.get_sample_value("cliplora_gateway_request_duration_seconds_count",
                                     {"model": "m", "version": "2", "method": "Classify", "code": "OK"}) == 1
    assert registry.get_sample_value("cliplora_gateway_request_duration_seconds_count",
                                     {"model": "unknown", "version": "", "method": "Classify", "code": "NOT_FOUND"}) == 1
    assert registry.get_sample_value("cliplora_gateway_images_total", {"model": "m"}) == 2
    assert registry.get_sample_value("cliplora_gateway_preprocess_duration_seconds_count") == 2


def test_status_mapping_is_complete() -> None:
    from cliplora.core import errors

    for error in (errors.InvalidArgument, errors.NotFound, errors.Unavailable, errors.ResourceExhausted,
                  errors.DeadlineExceeded, errors.FailedPrecondition, errors.PermissionDenied):
        code, message = to_status(error("why"), "Classify")
        assert code.name == error.code and message == "why"


def test_settings_from_flags_and_environment() -> None:
    settings = GatewaySettings.from_sources({"max_images": "8"}, {"CLIPLORA_MAX_IMAGES": "3", "CLIPLORA_GRACE_S": "2.5"})
    assert settings.max_images == 8 and settings.grace_s == 2.5
    from cliplora.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="max_concurrent must be positive"):
        GatewaySettings.from_sources({}, {"CLIPLORA_MAX_CONCURRENT": "0"})
    with pytest.raises(InvalidArgument, match="cannot parse"):
        GatewaySettings.from_sources({}, {"CLIPLORA_MAX_PIXELS": "lots"})


async def test_a_bad_image_cancels_the_text_side_of_a_labels_call() -> None:
    """Labels with an undecodable image: INVALID_ARGUMENT at once, without waiting for the
    (slow) text encoder, whose work is cancelled rather than left running."""
    triton = FakeTriton(delay=1.0)
    started = asyncio.get_running_loop().time()
    with pytest.raises(Aborted) as caught:
        await service(triton).Classify(pb.ClassifyRequest(model="ov", images=[pb.Image(encoded=b"garbage")],
                                                          labels=["wolf", "fox"]), FakeContext())
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert asyncio.get_running_loop().time() - started < 0.5  # not the text encoder's 1 s
    await asyncio.sleep(1.2)
    assert triton.texts_done == 0  # the text side was cancelled, not left running


async def test_labels_through_the_stand_in() -> None:
    """The head is built as the export builds it: label embeddings are the re-normalised
    mean of their prompts' embeddings, logits are logit_scale x cosine."""
    from cliplora.core import open_vocab
    from cliplora.core.tokenizer import get_tokenizer
    from tests.fakes import OPEN, fake_embeddings

    image = image_bytes()
    reply = await service().Classify(pb.ClassifyRequest(model="ov", images=[pb.Image(encoded=image)], top_k=0,
                                                        labels=["wolf", "red_fox"], templates=["a {}", "the {}."]),
                                     FakeContext())
    prompts = open_vocab.prompts(["wolf", "red_fox"], ["a {}", "the {}."])
    assert prompts == ["a wolf", "the wolf.", "a red fox", "the red fox."]
    heads = open_vocab.label_embeddings(fake_embeddings(get_tokenizer()(prompts)), 2)
    from cliplora.core.preprocess import preprocess_bytes

    crop = preprocess_bytes(image, 16)[None]
    expected = OPEN.open_vocabulary.logit_scale * fake_embeddings(crop.reshape(1, -1)) @ heads.T
    got = {p.label: p.logit for p in reply.results[0].predictions}
    np.testing.assert_allclose([got["wolf"], got["red_fox"]], expected[0], atol=1e-5)
