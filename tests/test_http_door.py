"""The HTTP door in process, with the stand-in for Triton (tests/fakes.py): the same answers
as gRPC, the same refusals with the statuses of the error table, the guards (tokens, origin,
body limit, deadline), OpenAI's embeddings shape and client, the model list and the document.

The door runs on aiohttp's test server (a port of its own, in this process); the gRPC side is
the same `ClassifierService` called the way gRPC calls it, so every comparison is door to door.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer

from cliplora.core import contract
from cliplora.core.errors import Unavailable
from cliplora.core.tokenizer import get_tokenizer
from cliplora.serve.gateway.errors import http_status
from cliplora.serve.gateway.service import ClassifierService
from cliplora.serve.gateway.web import openapi
from cliplora.serve.gateway.web.app import HttpDoor
from cliplora.v1 import classifier_pb2 as pb
from tests.fakes import (
    Aborted,
    FakeContext,
    FakeTriton,
    adapter_row,
    bank_entry,
    image_bytes,
    service,
)
from tests.images import encoded, make_image, png_header

TOKEN = "http-door-token-0123456789"
Door = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def door() -> AsyncIterator[Door]:
    """Makes doors (`await door(triton=..., tokens=..., **settings)`); closes them all at the end."""
    clients: list[TestClient] = []

    async def make(triton: FakeTriton | None = None, *, tokens: tuple[str, ...] = (), serving: bool = True,
                   **settings: object) -> TestClient:
        svc = service(triton, **settings)
        gate = HttpDoor(svc.handlers.settings, svc, SimpleNamespace(serving=serving), svc.metrics,
                        svc.handlers.images.pool, tuple(t.encode() for t in tokens), None)
        client = TestClient(TestServer(gate.application()))
        await client.start_server()
        client.door = gate  # type: ignore[attr-defined]  # for the tests that shut it or read its metrics
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def _door(client: TestClient) -> HttpDoor:
    return client.door  # type: ignore[attr-defined]


def _service(client: TestClient) -> ClassifierService:
    return _door(client).service


def _printed(reply: pb.ClassifyResponse, names: list[str]) -> list[dict]:
    """What `cliplora classify` prints for a gRPC reply, written out here (not by the door's code)."""
    return [{"image": name, "predictions": [{"label": p.label, "index": p.index, "score": p.score, "logit": p.logit}
                                            for p in result.predictions]}
            for name, result in zip(names, reply.results, strict=True)]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def _error(response) -> tuple[int, str, str]:
    body = await response.json()
    return response.status, body["error"]["code"], body["error"]["message"]


# -- the same answers as gRPC -------------------------------------------------------------

async def test_classify_json_is_what_grpc_answers(door: Door) -> None:
    client = await door()
    images = [image_bytes(1), image_bytes(2)]
    response = await client.post("/v1/classify", json={"model": "m", "images": [{"b64": _b64(i)} for i in images],
                                                      "top_k": 0})
    assert response.status == 200, await response.text()
    assert response.headers["Cliplora-Model"] == "m" and response.headers["Cliplora-Version"] == "2"
    answer = await response.json()
    grpc_reply = await _service(client).Classify(
        pb.ClassifyRequest(model="m", images=[pb.Image(encoded=i) for i in images], top_k=0), FakeContext())
    assert answer == _printed(grpc_reply, ["images[0]", "images[1]"])  # to the last bit
    assert [r["image"] for r in answer] == ["images[0]", "images[1]"]
    assert answer[0]["predictions"] != answer[1]["predictions"]  # two images, two answers: not trivially equal
    assert set(answer[0]["predictions"][0]) == {"label", "index", "score", "logit"}


async def test_multipart_equals_json_and_names_the_files(door: Door) -> None:
    client = await door()
    images = [image_bytes(3), image_bytes(4)]
    form = FormData()
    for i, data in enumerate(images):
        form.add_field("image", data, filename=f"photo-{i}.jpg", content_type="image/jpeg")
    for name, value in (("model", "ov"), ("labels", "a cat"), ("labels", "a dog"), ("labels", "a car"),
                        ("top_k", "2")):
        form.add_field(name, value)
    multipart = await (await client.post("/v1/classify", data=form)).json()
    as_json = await (await client.post("/v1/classify", json={
        "model": "ov", "images": [{"b64": _b64(i)} for i in images], "labels": ["a cat", "a dog", "a car"],
        "top_k": 2})).json()
    assert [r["image"] for r in multipart] == ["photo-0.jpg", "photo-1.jpg"]
    assert [r["predictions"] for r in multipart] == [r["predictions"] for r in as_json]
    assert {p["label"] for r in multipart for p in r["predictions"]} <= {"a cat", "a dog", "a car"}
    assert len(multipart[0]["predictions"]) == 2


async def test_a_bank_adapter_through_http(door: Door) -> None:
    triton = FakeTriton()
    triton.models["bank"] = bank_entry({1: [adapter_row("shop", 1, 3)]})
    client = await door(triton)
    response = await client.post("/v1/classify", json={"model": "bank", "adapter": "shop",
                                                      "images": [{"b64": _b64(image_bytes())}]})
    assert response.status == 200, await response.text()
    assert response.headers["Cliplora-Adapter"] == "shop"
    grpc_reply = await _service(client).Classify(
        pb.ClassifyRequest(model="bank", adapter="shop", images=[pb.Image(encoded=image_bytes())]), FakeContext())
    assert await response.json() == _printed(grpc_reply, ["images[0]"])


# -- the same refusals as gRPC ----------------------------------------------------------

SMALL = encoded(make_image(8, 8, seed=1), "PNG")
LIMITS = dict(max_images=4, max_image_bytes=1000, max_pixels=1_000_000)
GRPC_CASES = [  # what tests/test_gateway_unit.py sends as messages, here as JSON
    (dict(model="m", images=[]), "INVALID_ARGUMENT", "send 1 to 4 images"),
    (dict(model="m", images=[b"x"] * 5), "INVALID_ARGUMENT", "send 1 to 4 images"),
    (dict(model="m", images=[b"garbage"]), "INVALID_ARGUMENT", "image 0: not a decodable image"),
    (dict(model="m", images=[png_header(60000, 60000)]), "INVALID_ARGUMENT", "too large"),
    (dict(model="m", images=[b"\xff" * 2000]), "INVALID_ARGUMENT", "2000 bytes; the limit is 1000"),
    (dict(model="m", images=[b"x"], top_k=-1), "INVALID_ARGUMENT", "top_k must be"),
    (dict(model="../m", images=[b"x"]), "INVALID_ARGUMENT", "invalid model name"),
    (dict(model="x" * 10000, images=[b"x"]), "INVALID_ARGUMENT", "invalid model name"),
    (dict(model="m", version=-3, images=[b"x"]), "INVALID_ARGUMENT", "version must be"),
    (dict(model="other", images=[b"x"]), "NOT_FOUND", "model 'other' not found"),
    (dict(model="m", version=7, images=[b"x"]), "NOT_FOUND", "no ready version 7"),
    (dict(model="m", images=[SMALL], labels=["cat"]), "FAILED_PRECONDITION", "open-vocabulary"),
    (dict(model="m", images=[SMALL], adapter="shop"), "INVALID_ARGUMENT", "not an adapter bank"),
]


@pytest.mark.parametrize("fields,code,message", GRPC_CASES)
async def test_bad_requests_get_grpcs_status_and_words(door: Door, fields, code, message) -> None:
    client = await door(**LIMITS)
    body = {**fields, "images": [{"b64": _b64(data)} for data in fields["images"]]}
    status, got_code, got_message = await _error(await client.post("/v1/classify", json=body))
    with pytest.raises(Aborted) as grpc_said:
        await _service(client).Classify(pb.ClassifyRequest(**{**fields, "images": [
            pb.Image(encoded=data) for data in fields["images"]]}), FakeContext())
    assert (got_code, got_message) == (grpc_said.value.code.name, grpc_said.value.details)
    assert got_code == code and message in got_message
    assert status == http_status(grpc.StatusCode[code])
    assert status == {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 409}[code]


@pytest.mark.parametrize("body,message", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'{"model": "m", "images": [{"b64": "***"}]}', "images[0].b64 is not valid base64"),
    (b'{"model": "m", "images": [{"data": "AA=="}]}', 'images[0] must be {"b64"'),
    (b'{"model": "m", "images": "AA=="}', '"images" must be a list'),
    (b'{"model": "m", "images": [], "top_k": "five"}', '"top_k" must be an integer'),
    (b'{"model": "m", "images": [], "top_k": true}', '"top_k" must be an integer'),
    (b'{"model": 3, "images": []}', '"model" must be a string'),
    (b'{"images": []}', '"model" must be a string (it is required)'),
    (b'{"model": "m", "images": [], "labels": "cat"}', '"labels" must be a list of strings'),
    (b'{"model": "m", "images": [], "topk": 3}', "unknown field(s) in a classify request: topk"),
])
async def test_malformed_bodies_are_invalid_argument_and_counted(door: Door, body: bytes, message: str) -> None:
    client = await door()
    status, code, text = await _error(await client.post("/v1/classify", data=body,
                                                        headers={"Content-Type": "application/json"}))
    assert (status, code) == (400, "INVALID_ARGUMENT") and message in text, text
    assert _service(client).metrics.registry.get_sample_value(  # admission saw it, like a bad gRPC message
        "cliplora_gateway_request_duration_seconds_count",
        {"model": "unknown", "version": "", "method": "Classify", "code": "INVALID_ARGUMENT"}) == 1


async def test_statuses_of_the_error_table(door: Door) -> None:
    down = await door(FakeTriton(fail=Unavailable("Triton is unavailable: connection refused")))
    status, code, _ = await _error(await down.post("/v1/classify", json={"model": "m", "images": [
        {"b64": _b64(image_bytes())}]}))
    assert (status, code) == (503, "UNAVAILABLE")

    broken = await door(FakeTriton(fail=RuntimeError("secret detail /etc/passwd")))
    status, code, message = await _error(await broken.post("/v1/classify", json={"model": "m", "images": [
        {"b64": _b64(image_bytes())}]}))
    assert (status, code) == (500, "INTERNAL") and "secret" not in message and "incident" in message

    client = await door()
    status, code, _ = await _error(await client.get("/v1/nothing-here"))
    assert (status, code) == (404, "NOT_FOUND")
    response = await client.get("/v1/classify")
    assert response.status == 405 and response.headers["Allow"] == "POST"
    status, code, message = await _error(await client.post("/v1/classify", data=b"x",
                                                           headers={"Content-Type": "text/plain"}))
    assert (status, code) == (400, "INVALID_ARGUMENT") and "application/json or multipart/form-data" in message


async def test_overload_is_429_at_once(door: Door) -> None:
    client = await door(FakeTriton(delay=1.0), max_concurrent=1)
    body = {"model": "m", "images": [{"b64": _b64(image_bytes())}]}
    first = asyncio.ensure_future(client.post("/v1/classify", json=body))
    await asyncio.sleep(0.2)  # the first call holds the only slot
    second = await client.post("/v1/classify", json=body)
    assert second.status == 429 and second.headers["Retry-After"] == "1"
    assert (await second.json())["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert (await first).status == 200


async def test_the_deadline_header_is_the_calls_deadline(door: Door) -> None:
    client = await door(FakeTriton(delay=5.0))
    body = {"model": "m", "images": [{"b64": _b64(image_bytes())}]}
    started = asyncio.get_running_loop().time()
    status, code, _ = await _error(await client.post("/v1/classify", json=body, headers={"Request-Timeout": "0.3"}))
    assert (status, code) == (504, "DEADLINE_EXCEEDED")
    assert asyncio.get_running_loop().time() - started < 4.0  # cut at the deadline, not after "Triton" answered
    assert _service(client).metrics.registry.get_sample_value(
        "cliplora_gateway_request_duration_seconds_count",
        {"model": "m", "version": "2", "method": "Classify", "code": "DEADLINE_EXCEEDED"}) == 1
    assert _service(client).admission.in_flight == 0
    for bad in ("0", "-1", "soon", "nan", "inf"):
        status, code, message = await _error(await client.post("/v1/classify", json=body,
                                                               headers={"Request-Timeout": bad}))
        assert (status, code) == (400, "INVALID_ARGUMENT") and "Request-Timeout" in message


async def test_bodies_over_the_limit_are_413_before_they_are_read(door: Door) -> None:
    triton = FakeTriton()
    client = await door(triton, max_images=1, max_image_bytes=1000, max_labels=1, max_templates=1,
                        max_label_chars=10)
    limit = _door(client).settings.max_http_body_bytes
    big = b"{" + b" " * (limit + 10) + b"}"
    status, code, message = await _error(await client.post("/v1/classify", data=big,
                                                           headers={"Content-Type": "application/json"}))
    assert (status, code) == (413, "RESOURCE_EXHAUSTED") and str(limit) in message

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: aiohttp stops reading at the limit
        for _ in range(limit // 4096 + 2):
            yield b" " * 4096

    status, code, _ = await _error(await client.post("/v1/classify", data=chunks(),
                                                     headers={"Content-Type": "application/json"}))
    assert (status, code) == (413, "RESOURCE_EXHAUSTED")
    assert triton.batches == []
    fits = {"model": "m", "images": [{"b64": _b64(b"\xff" * 900)}]}  # a body within the limit is read
    assert (await _error(await client.post("/v1/classify", json=fits)))[0] == 400  # (not an image)


# -- guards -----------------------------------------------------------------------------

async def test_tokens_guard_the_api_but_not_health_or_the_page(door: Door) -> None:
    client = await door(tokens=(TOKEN,))
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        response = await client.get("/v1/models", headers=headers)
        assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert (await response.json())["error"]["code"] == "UNAUTHENTICATED"
    assert (await client.get("/v1/models", headers={"Authorization": f"bearer {TOKEN}"})).status == 200
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert (await client.get(path)).status == 200, path
    assert _service(client).metrics.unauthenticated._value.get() == 3


async def test_calls_from_another_sites_page_are_refused(door: Door) -> None:
    client = await door()
    own = f"http://{client.host}:{client.port}"
    assert (await client.get("/v1/models", headers={"Origin": own})).status == 200
    behind_tls = {"Origin": "https://classify.example", "Host": "classify.example"}  # a proxy ended TLS
    assert (await client.get("/v1/models", headers=behind_tls)).status == 200
    forwarded = {"Origin": "https://classify.example", "X-Forwarded-Host": "classify.example"}
    assert (await client.get("/v1/models", headers=forwarded)).status == 200
    chained = {"Origin": "https://classify.example", "X-Forwarded-Host": "classify.example, inner.local"}
    assert (await client.get("/v1/models", headers=chained)).status == 200
    portless = {"Origin": "https://classify.example:8443", "Host": "classify.example"}  # nginx's $host
    assert (await client.get("/v1/models", headers=portless)).status == 200
    other_port = {"Origin": "https://classify.example:8443", "Host": "classify.example:9000"}
    assert (await client.get("/v1/models", headers=other_port)).status == 403
    for origin in ("https://evil.example", "null", f"http://{client.host}:{client.port + 1}"):
        status, code, message = await _error(await client.get("/v1/models", headers={"Origin": origin}))
        assert (status, code) == (403, "PERMISSION_DENIED") and "cross-origin" in message


async def test_health_readiness_and_shutdown(door: Door) -> None:
    ready = await door()
    assert await (await ready.get("/readyz")).json() == {"status": "ready"}
    not_ready = await door(serving=False)
    assert (await not_ready.get("/healthz")).status == 200
    assert (await _error(await not_ready.get("/readyz")))[:2] == (503, "UNAVAILABLE")
    _door(ready).refuse_new()
    assert (await _error(await ready.get("/healthz")))[:2] == (503, "UNAVAILABLE")
    assert (await _error(await ready.get("/v1/models")))[:2] == (503, "UNAVAILABLE")


# -- OpenAI embeddings ------------------------------------------------------------------

async def test_embeddings_in_openais_shape_and_input_order(door: Door) -> None:
    client = await door()
    image = image_bytes(5)
    inputs = ["a photo of a cat", f"data:image/jpeg;base64,{_b64(image)}", "a dog"]
    answer = await (await client.post("/v1/embeddings", json={"model": "ov", "input": inputs})).json()
    grpc_reply = await _service(client).Embed(
        pb.EmbedRequest(model="ov", images=[pb.Image(encoded=image)], texts=["a photo of a cat", "a dog"]),
        FakeContext())
    assert answer["object"] == "list" and answer["model"] == "ov"
    assert [d["index"] for d in answer["data"]] == [0, 1, 2] and {d["object"] for d in answer["data"]} == {"embedding"}
    got = [np.asarray(d["embedding"], dtype=np.float32) for d in answer["data"]]
    np.testing.assert_array_equal(got[0], np.asarray(grpc_reply.texts[0].values, dtype=np.float32))
    np.testing.assert_array_equal(got[1], np.asarray(grpc_reply.images[0].values, dtype=np.float32))
    np.testing.assert_array_equal(got[2], np.asarray(grpc_reply.texts[1].values, dtype=np.float32))
    assert not np.array_equal(got[0], got[2])  # two texts, two embeddings
    tokenizer = get_tokenizer()
    tokens = sum(len(tokenizer.encode(t)) + 2 for t in ("a photo of a cat", "a dog"))
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    packed = await (await client.post("/v1/embeddings", json={"model": "ov", "input": inputs,
                                                              "encoding_format": "base64"})).json()
    for plain, d in zip(got, packed["data"], strict=True):
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4"), plain)
    single = await (await client.post("/v1/embeddings", json={"model": "ov", "input": "a dog"})).json()
    np.testing.assert_array_equal(np.asarray(single["data"][0]["embedding"], dtype=np.float32), got[2])


@pytest.mark.parametrize("body,status,code,message", [
    ({"model": "ov", "input": []}, 400, "INVALID_ARGUMENT", '"input" must be a string or a non-empty list'),
    ({"model": "ov", "input": [[1, 2, 3]]}, 400, "INVALID_ARGUMENT", "token arrays are not supported"),
    ({"model": "ov", "input": "x", "encoding_format": "int8"}, 400, "INVALID_ARGUMENT", "encoding_format"),
    ({"model": "ov", "input": "data:image/png,abc"}, 400, "INVALID_ARGUMENT", "without base64 data"),
    ({"model": "ov", "input": "data:image/png;base64,@@"}, 400, "INVALID_ARGUMENT", "input[0] is not valid base64"),
    ({"model": "ov", "input": "x", "dimensions": 3}, 400, "INVALID_ARGUMENT", '"dimensions" 3 cannot be served'),
    ({"model": "ov", "input": "x", "temperature": 1}, 400, "INVALID_ARGUMENT", "unknown field(s)"),
    ({"model": "m", "input": "a cat"}, 409, "FAILED_PRECONDITION", "open-vocabulary"),
    ({"model": "nope", "input": "a cat"}, 404, "NOT_FOUND", "not found"),
])
async def test_bad_embeddings_requests(door: Door, body, status, code, message) -> None:
    client = await door()
    got_status, got_code, text = await _error(await client.post("/v1/embeddings", json=body))
    assert (got_status, got_code) == (status, code) and message in text, text


@pytest.mark.subprocess  # the client runs `uname -p` for its platform headers
async def test_the_openai_client_works_unchanged(door: Door) -> None:
    openai = pytest.importorskip("openai")
    client = await door(tokens=(TOKEN,))
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=TOKEN, max_retries=0)
    try:
        result = await api.embeddings.create(model="ov", input=["a cat", "a dog"])  # base64 on the wire by default
        as_floats = await api.embeddings.create(model="ov", input="a cat", encoding_format="float")
        listed = await api.models.list()
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="wrong-token-0123456789",
                                     max_retries=0).embeddings.create(model="ov", input="a cat")
    finally:
        await api.close()
    grpc_reply = await _service(client).Embed(pb.EmbedRequest(model="ov", texts=["a cat", "a dog"]), FakeContext())
    for row, expected in zip(result.data, grpc_reply.texts, strict=True):
        np.testing.assert_array_equal(np.asarray(row.embedding, dtype=np.float32),
                                      np.asarray(expected.values, dtype=np.float32))
    assert result.data[0].embedding != result.data[1].embedding
    assert np.allclose(as_floats.data[0].embedding, result.data[0].embedding, rtol=0, atol=0)
    assert result.usage.prompt_tokens > 0 and result.model == "ov"
    assert {m.id for m in listed.data} >= {"m", "ov"}


# -- the model list and the document ------------------------------------------------------

async def test_models_in_openais_list_with_every_model_info_field(door: Door) -> None:
    triton = FakeTriton()
    triton.models["bank"] = bank_entry({1: [adapter_row("shop", 1, 3)]})
    client = await door(triton)
    listed = await (await client.get("/v1/models")).json()
    grpc_reply = await _service(client).ListModels(pb.ListModelsRequest(), FakeContext())
    assert listed["object"] == "list"
    by_id = {m["id"]: m for m in listed["data"]}
    assert set(by_id) == {info.name for info in grpc_reply.models}
    for info in grpc_reply.models:
        model = by_id[info.name]
        assert model["object"] == "model" and model["owned_by"] == "cliplora"
        assert set(model) >= {fd.name for fd in pb.ModelInfo.DESCRIPTOR.fields}
        assert model["versions"] == list(info.versions) and all(isinstance(v, int) for v in model["versions"])
    assert by_id["ov"]["open_vocabulary"] is True and by_id["m"]["open_vocabulary"] is False
    assert by_id["bank"]["kind"] == contract.KIND_BANK
    assert [a["id"] for a in by_id["bank"]["adapters"]] == [a.id for a in next(
        info for info in grpc_reply.models if info.name == "bank").adapters]
    assert all(isinstance(a["version_added"], int) for a in by_id["bank"]["adapters"])


async def test_the_document_names_every_route_and_no_other(door: Door) -> None:
    client = await door()
    served = {resource.canonical.replace("/static", "/static/{name}") if resource.canonical == "/static"
              else resource.canonical for resource in client.app.router.resources()}
    document = await (await client.get("/openapi.json")).json()
    assert document == openapi.document() and document["openapi"].startswith("3.1")
    assert set(document["paths"]) == served
    methods = {(route.resource.canonical, route.method) for route in client.app.router.routes()
               if route.method != "HEAD"}
    for path, operations in document["paths"].items():
        for method in operations:
            key = ("/static" if path == "/static/{name}" else path, method.upper())
            assert key in methods, key


async def test_the_page_is_served_with_a_strict_policy(door: Door) -> None:
    client = await door()
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    for asset in ("/static/playground.js", "/static/playground.css"):
        assert asset in html
        assert (await client.get(asset)).status == 200


async def test_http_answers_are_counted_by_route_and_status(door: Door) -> None:
    client = await door()
    await client.post("/v1/classify", json={"model": "m", "images": [{"b64": _b64(image_bytes())}]})
    await client.post("/v1/classify", json={"model": "nope", "images": [{"b64": _b64(image_bytes())}]})
    await client.get("/no/such/path")
    registry = _service(client).metrics.registry
    count = registry.get_sample_value
    assert count("cliplora_gateway_http_responses_total", {"route": "/v1/classify", "status": "200"}) == 1
    assert count("cliplora_gateway_http_responses_total", {"route": "/v1/classify", "status": "404"}) == 1
    assert count("cliplora_gateway_http_responses_total", {"route": "unmatched", "status": "404"}) == 1
    assert count("cliplora_gateway_request_duration_seconds_count",
                 {"model": "m", "version": "2", "method": "Classify", "code": "OK"}) == 1


def test_app_module_answers_json_errors_only() -> None:
    """Every aiohttp error the door can meet becomes the door's JSON (no HTML error page)."""
    from cliplora.serve.gateway.web.responses import from_aiohttp

    for exc in (web.HTTPNotFound(), web.HTTPMethodNotAllowed("PUT", ["POST"]), web.HTTPRequestEntityTooLarge(1, 2),
                web.HTTPBadRequest(reason="bad header")):
        response = from_aiohttp(exc, 1)
        assert response.content_type == "application/json"
        assert json.loads(response.body)["error"]["code"] in {"NOT_FOUND", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}


def test_the_door_port_is_checked_with_the_others() -> None:
    from cliplora.core.errors import InvalidArgument
    from cliplora.serve.gateway.server import check_before_start, endpoint_lines
    from cliplora.serve.gateway.settings import GatewaySettings

    with pytest.raises(InvalidArgument, match="port 5000 is given twice: --grpc-port and --http-port"):
        check_before_start(GatewaySettings(grpc_port=5000, http_port=5000))
    with pytest.raises(InvalidArgument, match="http_port must be in 0..65535"):
        GatewaySettings(http_port=70000)
    assert not any("playground" in line for line in endpoint_lines(GatewaySettings()))  # 0: no door
    assert any(line.endswith("http://127.0.0.1:8080/") and "playground" in line
               for line in endpoint_lines(GatewaySettings(http_port=8080)))
    assert GatewaySettings().max_http_body_bytes > 4 * GatewaySettings().max_message_bytes // 3


def _multipart(*parts: tuple[str, dict[str, str], bytes]) -> tuple[bytes, str]:
    """A form written out by hand: (disposition parameters, extra headers, body) per part."""
    boundary = "cliplora-test-boundary"
    out = b""
    for disposition, headers, body in parts:
        lines = [f"--{boundary}", f"Content-Disposition: form-data; {disposition}",
                 *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        out += "\r\n".join(lines).encode() + body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def test_forms_are_read_in_memory_within_the_limit(door: Door, monkeypatch) -> None:
    import tempfile

    def no_spooling(*args, **kwargs):
        raise AssertionError("a form part went to a temporary file")

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", no_spooling)
    client = await door(max_images=1, max_image_bytes=1000, max_labels=1, max_templates=1, max_label_chars=10)
    limit = _door(client).settings.max_http_body_bytes
    ok_body, content_type = _multipart(('name="model"', {}, b"m"),
                                       ('name="image"; filename="a.jpg"', {}, image_bytes(0)[:900]))
    status, code, message = await _error(await client.post("/v1/classify", data=ok_body,
                                                           headers={"Content-Type": content_type}))
    assert (status, code) == (400, "INVALID_ARGUMENT") and message.startswith("image 0: ")  # read, then judged
    big, content_type = _multipart(('name="model"', {}, b"m"),
                                   ('name="image"; filename="a.jpg"', {}, b"\xff" * (limit + 1)))

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the reader counts
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    status, code, _ = await _error(await client.post("/v1/classify", data=chunked(),
                                                     headers={"Content-Type": content_type}))
    assert (status, code) == (413, "RESOURCE_EXHAUSTED")


@pytest.mark.parametrize("parts,message", [
    ([('name="model"', {}, b"m"), ('name="image"', {}, b"not a file")], "form field image #0 is text"),
    ([('name="model"; filename="m.txt"', {}, b"m"), ('name="image"; filename="a.jpg"', {}, b"x")],
     "form field model must be text"),
    ([('name="model"', {}, b"m"), ('name="model"', {}, b"m"), ('name="image"; filename="a"', {}, b"x")],
     "form field model is given 2 times"),
    ([('name="image"; filename="a.jpg"', {}, b"x")], "form field model is required"),
    ([('name="model"', {}, b"m"), ('name="image"; filename="a.jpg"', {"Content-Encoding": "deflate"}, b"x")],
     "compressed parts are not accepted"),
    ([('filename="a.jpg"', {}, b"x")], "every form part needs a name"),
    ([('name="model"', {}, b"m"), ('name="images"; filename="a.jpg"', {}, b"x")], "unknown field(s) in a classify form"),
])
async def test_bad_forms_are_invalid_argument(door: Door, parts, message) -> None:
    client = await door()
    body, content_type = _multipart(*parts)
    status, code, text = await _error(await client.post("/v1/classify", data=body,
                                                        headers={"Content-Type": content_type}))
    assert (status, code) == (400, "INVALID_ARGUMENT") and message in text, text


async def test_a_taken_port_is_named_not_a_traceback() -> None:
    import socket

    from cliplora.core.errors import Unavailable
    from cliplora.serve.gateway.server import GatewayServer
    from cliplora.serve.gateway.settings import GatewaySettings
    from tests.ports import free_port

    with socket.socket() as holder:
        port = free_port()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        gateway = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=-1, http_port=port,
                                                triton_url=f"127.0.0.1:{free_port()}"))
        try:
            with pytest.raises(Unavailable, match=f"cannot listen on 127.0.0.1:{port} for the HTTP door .*--http-port"):
                await gateway.start()
        finally:
            await gateway.stop(0)


async def test_a_body_is_read_inside_admission(door: Door) -> None:
    """A call holds its admission slot while its body arrives: the concurrency limit
    applies before anything is buffered, and the drain at shutdown waits for an upload."""
    client = await door()
    svc = _service(client)
    body = json.dumps({"model": "m", "images": [{"b64": _b64(image_bytes())}]}).encode()
    halfway = asyncio.Event()

    async def slowly() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        halfway.set()
        await asyncio.sleep(0.5)
        yield body[len(body) // 2:]

    call = asyncio.ensure_future(client.post("/v1/classify", data=slowly(),
                                             headers={"Content-Type": "application/json"}))
    await halfway.wait()
    await asyncio.sleep(0.1)
    assert svc.admission.in_flight == 1  # admitted while half of its body is still to come
    _door(client).refuse_new()
    assert await svc.admission.drain(5.0) == 0  # the drain waited for the upload and its answer
    assert (await call).status == 200


@pytest.mark.parametrize("body,content_type,message", [
    (b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--x--\r\n", "multipart/form-data",
     "malformed multipart/form-data body"),  # no boundary parameter
    (b"garbage before the boundary", "multipart/form-data; boundary=x", "malformed multipart/form-data body"),
    (b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\nContent-Transfer-Encoding: x-foo"
     b"\r\n\r\n@@@\r\n--x--\r\n", "multipart/form-data; boundary=x", "malformed multipart/form-data body"),
])
async def test_malformed_multipart_is_400_not_500(door: Door, body: bytes, content_type: str, message: str) -> None:
    client = await door()
    status, code, text = await _error(await client.post("/v1/classify", data=body,
                                                        headers={"Content-Type": content_type}))
    assert (status, code) == (400, "INVALID_ARGUMENT") and message in text, text


async def test_form_parts_are_bounded_by_the_limits_not_below_them(door: Door) -> None:
    """A form may carry every label the limits allow (1000 by default), and no more parts
    than the limits add up to."""
    client = await door(max_images=1, max_templates=1)
    limit = _door(client).settings.max_form_parts
    parts = [('name="model"', {}, b"ov"), ('name="image"; filename="a.png"', {}, image_bytes())]
    labels = [('name="labels"', {}, f"label {i}".encode()) for i in range(1000)]
    fits, content_type = _multipart(*parts, *labels)
    response = await client.post("/v1/classify", data=fits, headers={"Content-Type": content_type})
    assert response.status == 200, await response.text()
    over, content_type = _multipart(*parts, *[('name="labels"', {}, b"x")] * limit)
    status, code, text = await _error(await client.post("/v1/classify", data=over,
                                                        headers={"Content-Type": content_type}))
    assert (status, code) == (400, "INVALID_ARGUMENT") and f"more than {limit} form parts" in text


@pytest.mark.parametrize("fields,message", [
    ({"top_k": 10_000_000_000}, '"top_k" is out of range'),
    ({"version": 2**64}, '"version" is out of range'),
])
async def test_integers_out_of_range_are_400_not_500(door: Door, fields: dict, message: str) -> None:
    client = await door()
    status, code, text = await _error(await client.post("/v1/classify", json={
        "model": "m", "images": [{"b64": _b64(image_bytes())}], **fields}))
    assert (status, code) == (400, "INVALID_ARGUMENT") and message in text, text


async def _raw(client: TestClient, head: bytes) -> bytes:
    """What the door first answers to `head` written on a socket as it is (no client in between)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


async def test_a_token_that_is_not_utf8_is_401(door: Door) -> None:
    client = await door(tokens=(TOKEN,))
    answer = await _raw(client, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe-not-utf8\r\n"
                                b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert _service(client).metrics.unauthenticated._value.get() == 1


async def test_expect_100_continue_meets_the_guard_first(door: Door) -> None:
    """A client that waits for ``100 Continue`` hears its refusal instead, before it sends
    its body; one the guard lets in is told to go on."""
    client = await door(tokens=(TOKEN,))
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000000\r\nExpect: 100-continue\r\n")
    assert (await _raw(client, head + b"\r\n")).startswith(b"HTTP/1.1 401 ")
    big = head.replace(b"5000000", str(_door(client).settings.max_http_body_bytes + 1).encode())
    assert (await _raw(client, big + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())).startswith(b"HTTP/1.1 413 ")
    assert (await _raw(client, head + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())).startswith(
        b"HTTP/1.1 100 Continue")
    count = _service(client).metrics.registry.get_sample_value
    assert count("cliplora_gateway_http_responses_total", {"route": "/v1/classify", "status": "401"}) == 1


async def test_static_files_do_not_leave_their_folder(door: Door) -> None:
    from yarl import URL

    client = await door()
    for raw in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py"):
        response = await client.get(URL(raw, encoded=True))
        assert response.status in (403, 404), raw
        assert "HttpDoor" not in await response.text(), raw
