"""`cliplora loadtest` through the gateway's HTTP door (``http:ENTRY`` entries, ``--http-target``):
the JSON requests it sends, how it counts failures, and one model through both doors
interleaved on the same images. The servers are stubs started in this process and stopped
by their fixtures: an aiohttp door (docs/architecture.md's HTTP door, its routes and error
JSON) and a gRPC Classifier that only records what it is asked."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
from aiohttp import web

from cliplora.cli import main
from cliplora.core.errors import InvalidArgument, NotFound
from cliplora.loadtest.cli import generated_images
from cliplora.loadtest.entries import Entry, parse_entry
from cliplora.loadtest.http_door import HttpTarget, parse_address
from cliplora.loadtest.runner import RunResult, run_load
from cliplora.loadtest.targets import DoorsTarget, GatewayTarget, RequestFailed, Target
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc
from tests.serving import free_port

TOKEN = "s3cret"
BANK_ADAPTERS = ("base", "a", "b", "c")


@dataclass
class Seen:
    """One request a stub was sent: which model, adapter and labels, the image bytes."""

    model: str
    adapter: str
    labels: tuple[str, ...]
    images: tuple[bytes, ...]
    headers: dict[str, str] = field(default_factory=dict)
    top_k: int = 0


class StubDoor:
    """The HTTP door's classify and models routes, recording each request. Model ``down``
    answers 503 with the door's error JSON, ``proxy`` 502 with an HTML page, ``short`` a
    200 with one answer too few; with `token`, /v1/* want ``Authorization: Bearer``."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.seen: list[Seen] = []
        self.app = web.Application()
        self.app.add_routes([web.get("/v1/models", self.models), web.post("/v1/classify", self.classify)])

    def _refused(self, request: web.Request) -> web.Response | None:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": {"code": "UNAUTHENTICATED", "message": "no token"}}, status=401)
        return None

    async def models(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused:
            return refused
        data = [{"id": name, "object": "model", "kind": "classifier", "adapters": []}
                for name in ("base", "down", "proxy", "short")]
        data.append({"id": "shop", "object": "model", "kind": "bank", "adapters": [{"id": a} for a in BANK_ADAPTERS]})
        return web.json_response({"object": "list", "data": data})

    async def classify(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused:
            return refused
        body = await request.json()
        images = tuple(base64.b64decode(image["b64"]) for image in body["images"])
        self.seen.append(Seen(body["model"], body.get("adapter", ""), tuple(body.get("labels", ())), images,
                              dict(request.headers), body.get("top_k", 0)))
        if body["model"] == "down":
            return web.json_response({"error": {"code": "UNAVAILABLE", "message": "Triton away"}}, status=503)
        if body["model"] == "proxy":
            return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")
        answers = [{"image": f"images[{i}]", "predictions": [{"label": "cat", "index": 0, "score": 1.0, "logit": 3.0}]}
                   for i in range(len(images) - (body["model"] == "short"))]
        return web.json_response(answers)


class StubClassifier(pb_grpc.ClassifierServicer):
    """The gRPC API's ListModels (model ``base`` only) and Classify, recording each Classify."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="base", kind="classifier")])

    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        self.seen.append(Seen(request.model, request.adapter, tuple(request.labels),
                              tuple(image.encoded for image in request.images), top_k=request.top_k))
        return pb.ClassifyResponse(model=request.model, results=[pb.Classification() for _ in request.images])


@pytest.fixture()
async def door() -> AsyncIterator[tuple[StubDoor, str]]:
    """A stub HTTP door on a free port of this process's loop; (stub, HOST:PORT)."""
    stub = StubDoor()
    runner = web.AppRunner(stub.app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield stub, f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture()
async def grpc_stub() -> AsyncIterator[tuple[StubClassifier, str]]:
    """A stub gRPC Classifier on a free port of this process's loop; (stub, HOST:PORT)."""
    stub = StubClassifier()
    server = grpc.aio.server()
    pb_grpc.add_ClassifierServicer_to_server(stub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield stub, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def entries_of(*texts: str) -> dict:
    return {text: parse_entry(text) for text in texts}



async def _run(target: Target, entries: dict[str, Entry], requests: int) -> RunResult:
    """`requests` requests over `entries`, one at a time, on a started `target`, which is
    closed afterwards whatever happened."""
    try:
        return await run_load(target, list(entries), concurrency=1, duration_s=30, warmup_s=0, max_requests=requests,
                              progress=False)
    finally:
        await target.close()

async def test_one_model_through_both_doors_gets_the_same_images(door, grpc_stub) -> None:
    """``base,http:base``: requests alternate between the doors, and each door is offered
    every image, in the same order (not the even ones to one door and the odd to the other)."""
    (http, http_address), (rpc, rpc_address) = door, grpc_stub
    images = generated_images(4)
    entries = entries_of("base", "http:base")
    target = DoorsTarget({"grpc": GatewayTarget(rpc_address, images, entries=entries),
                          "http": HttpTarget(http_address, images, entries=entries, connections=2)}, entries)
    await target.start(list(entries))
    result = await _run(target, entries, 16)
    assert {r.code for r in result.records} == {"OK"} and [r.model for r in result.records[:2]] == list(entries)
    assert len(http.seen) == len(rpc.seen) == 8 and {s.model for s in http.seen + rpc.seen} == {"base"}
    assert all(s.top_k == 5 == r.top_k for s, r in zip(http.seen, rpc.seen, strict=True))
    sent = [s.images[0] for s in rpc.seen]
    assert sent == [s.images[0] for s in http.seen]
    assert sent == images * 2 and len(set(sent)) == 4  # every image, not the same one over and over


async def test_each_door_prepares_only_its_own_entries(door, grpc_stub) -> None:
    """``base,http:shop@*`` where only the HTTP door serves the bank: the gRPC side leaves
    the http: entry alone (it would refuse a bank it does not serve), and each entry's
    requests reach its own door."""
    (http, http_address), (rpc, rpc_address) = door, grpc_stub
    images = generated_images(2)
    entries = entries_of("base", "http:shop@*")
    target = DoorsTarget({"grpc": GatewayTarget(rpc_address, images, entries=entries),
                          "http": HttpTarget(http_address, images, entries=entries)}, entries)
    await target.start(list(entries))
    try:
        for item in range(4):
            await target.send(list(entries)[item % 2], item)
    finally:
        await target.close()
    assert [(s.model, s.adapter) for s in rpc.seen] == [("base", "")] * 2
    assert [(s.model, s.adapter) for s in http.seen] == [("shop", "a"), ("shop", "b")]


async def test_requests_ask_what_the_entry_asks(door, monkeypatch) -> None:
    """Adapter, labels (fresh ones each time for :labels-cold), NAME@* round robin over the
    bank's adapters but its base, batches of distinct images, the token and the deadline."""
    stub, address = door
    stub.token = TOKEN
    monkeypatch.setenv("CLIPLORA_TOKEN", TOKEN)
    images = generated_images(3)
    entries = entries_of("http:shop@a", "http:base:labels-cold", "http:shop@*")
    entries["http:base:labels-cold"] = replace(entries["http:base:labels-cold"], labels=("cat", "dog"))
    target = HttpTarget(address, images, entries=entries, batch=2, connections=1, timeout_s=7.5)
    await target.start(list(entries))
    try:
        for item in range(9):
            await target.send(list(entries)[item % 3], item)
    finally:
        await target.close()
    by_entry = [stub.seen[i::3] for i in range(3)]
    assert {(s.model, s.adapter, s.labels) for s in by_entry[0]} == {("shop", "a", ())}
    assert [s.labels for s in by_entry[1]] == [("cat 1", "dog 1"), ("cat 4", "dog 4"), ("cat 7", "dog 7")]
    assert [(s.model, s.adapter) for s in by_entry[2]] == [("shop", "a"), ("shop", "b"), ("shop", "c")]
    assert all(len(s.images) == 2 and s.images[0] != s.images[1] for s in stub.seen)
    assert [s.images for s in by_entry[0]] == [(images[0], images[1]), (images[1], images[2]), (images[2], images[0])]
    headers = stub.seen[0].headers
    assert headers["Authorization"] == f"Bearer {TOKEN}" and float(headers["Request-Timeout"]) == 7.5
    assert headers["Content-Type"] == "application/json"


async def test_failures_are_counted_by_their_status_name(door) -> None:
    """The door's error JSON gives the gRPC status name; a page without it counts as
    HTTP_<status>; a 200 with an answer missing is not a success; nothing stops the run."""
    stub, address = door
    entries = entries_of("http:base", "http:down", "http:proxy", "http:short")
    target = HttpTarget(address, generated_images(2), entries=entries, connections=4)
    await target.start(list(entries))
    result = await _run(target, entries, 20)
    assert result.errors("http:base") == {}
    assert result.errors("http:down") == {"UNAVAILABLE": 5}
    assert result.errors("http:proxy") == {"HTTP_502": 5}
    assert result.errors("http:short") == {"BAD_ANSWER": 5}


async def test_a_door_gone_counts_unavailable() -> None:
    """The door stops after the target started: its requests fail UNAVAILABLE (as gRPC's
    would), counted, not raised."""
    stub = StubDoor()
    runner = web.AppRunner(stub.app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    entries = entries_of("http:base")
    target = HttpTarget(f"127.0.0.1:{port}", generated_images(1), entries=entries)
    try:
        await target.start(list(entries))
    finally:
        await runner.cleanup()
    result = await _run(target, entries, 2)
    assert result.errors("http:base") == {"UNAVAILABLE": 2}


@pytest.mark.parametrize(("models", "says"), [
    ("http:gone", "serves no model 'gone' (it serves base, down, proxy, shop, short)"),
    ("http:base@*", "'base' is not a bank the door serves"),
])
async def test_start_refuses_what_the_door_does_not_serve(door, models: str, says: str) -> None:
    _, address = door
    entries = entries_of(models)
    target = HttpTarget(address, generated_images(1), entries=entries)
    with pytest.raises((NotFound, InvalidArgument), match=re.escape(says)):
        await target.start(list(entries))
    assert target.session.closed


async def test_a_missing_token_is_named_at_start(door) -> None:
    stub, address = door
    stub.token = TOKEN
    target = HttpTarget(address, generated_images(1), entries=entries_of("http:base"))
    with pytest.raises(RequestFailed, match="UNAUTHENTICATED.*is CLIPLORA_TOKEN set"):
        await target.start(["http:base"])
    assert target.session.closed


async def test_the_cli_runs_both_doors_into_one_report(door, grpc_stub, tmp_path: Path) -> None:
    """`cliplora loadtest --target G --http-target H --models base,http:base`: one report,
    both entries measured without error, the ratio http:base/base with its interval."""
    (http, http_address), (rpc, rpc_address) = door, grpc_stub
    argv = ["loadtest", "--target", rpc_address, "--http-target", http_address, "--models", "base,http:base",
            "--requests", "40", "--duration", "30", "--warmup", "0", "--concurrency", "2",
            "--report", str(tmp_path / "r"), "--quiet"]
    assert await asyncio.to_thread(main, argv) == 0  # the CLI's own loop, beside the stubs' one
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {name: m["errors"] for name, m in report["models"].items()} == {"base": 0, "http:base": 0}
    assert report["models"]["base"]["requests"] + report["models"]["http:base"]["requests"] == 40
    assert set(report["ratios"]) == {"http:base/base"} and report["ratios"]["http:base/base"]["throughput"] > 0
    assert "HTTP door" in report["run"]["target"] and "gateway" in report["run"]["target"]
    assert len(http.seen) >= 20 and len(rpc.seen) >= 20


@pytest.mark.parametrize(("flags", "says"), [
    (["--models", "http:base"], "'http:base' needs --http-target HOST:PORT"),
    (["--models", "base", "--target", "127.0.0.1:1", "--http-target", "127.0.0.1:2"],
     "--http-target goes with an http:ENTRY entry"),
    (["--models", "base,http:base", "--target", "127.0.0.1:1", "--http-target", "127.0.0.1:2", "--raw"],
     "HTTP door takes encoded images"),
    (["--models", "http:base", "--direct-triton", "--target", "127.0.0.1:1", "--http-target", "127.0.0.1:2"],
     "not with --direct-triton"),
    (["--models", "http:base", "--http-target", "http://127.0.0.1:8080"], "--http-target must be HOST:PORT"),
    (["--models", "https:base", "--http-target", "127.0.0.1:2"], "before the name, http: for the HTTP door"),
])
def test_bad_door_flags_are_refused(tmp_path: Path, capsys, flags: list[str], says: str) -> None:
    code = main(["loadtest", *flags, "--report", str(tmp_path / "r"), "--quiet"])
    assert code == 1 and says in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("address", "ok"), [
    ("127.0.0.1:8080", True), ("gateway.local:80", True), ("[::1]:8080", True),
    ("127.0.0.1", False), ("127.0.0.1:http", False), (":8080", False), ("h:0", False), ("h:70000", False),
])
def test_http_target_addresses(address: str, ok: bool) -> None:
    if ok:
        assert parse_address(address) == f"http://{address}"
    else:
        with pytest.raises(InvalidArgument, match="--http-target must be HOST:PORT"):
            parse_address(address)
