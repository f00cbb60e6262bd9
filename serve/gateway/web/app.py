"""The HTTP door's routes, served by aiohttp on the gateway's own event loop.

Every answer goes through `_answers` (errors as `cliplora.serve.gateway.web.responses`
writes them, with the status of the one table; the ``cliplora_gateway_http_responses_total``
counter), and every ``/v1/`` call through the
`Guard` first (also before ``100 Continue`` is sent). A call's body is read and turned into
the gRPC message *inside* admission (`ClassifierService.classify`), so the concurrency
limit, the deadline, the drain, the request histogram and the error table are gRPC's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from cliplora.core import contract
from cliplora.core.errors import CliploraError, InvalidArgument, ResourceExhausted, Unavailable
from cliplora.core.tokenizer import get_tokenizer
from cliplora.serve.gateway.errors import HTTP_BODY_TOO_LARGE, to_status
from cliplora.serve.gateway.health import TritonHealth
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.service import ClassifierService
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.gateway.web import convert, openapi
from cliplora.serve.gateway.web.bodies import TooLarge, read_body, read_form
from cliplora.serve.gateway.web.calls import TIMEOUT_HEADER, CallAborted, HttpCall
from cliplora.serve.gateway.web.guard import Guard
from cliplora.serve.gateway.web.responses import (
    SHUTTING_DOWN,
    error_response,
    from_aiohttp,
    too_large_message,
)

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
SHUTDOWN_TIMEOUT_S = 1.0  # for what admission does not hold at the end (a stalled connection)
OFFLOAD_BYTES = 1 << 20  # bodies larger than this are parsed in the pool, off the event loop
JSON_TYPES = ("application/json", "application/octet-stream", "")  # "": curl --data-binary without -H
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CALL = web.RequestKey("cliplora_call", HttpCall)  # the request's call context
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpDoor:
    """`start()` binds ``--host:--http-port``; `refuse_new()` then `stop()` at shutdown
    (the calls in flight are admission's, drained with gRPC's)."""

    def __init__(self, settings: GatewaySettings, service: ClassifierService, health: TritonHealth,
                 metrics: GatewayMetrics, pool: Executor, tokens: tuple[bytes, ...],
                 ssl_context: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.service = service
        self.health = health
        self.metrics = metrics
        self.pool = pool
        self.ssl_context = ssl_context
        self.limit = settings.max_http_body_bytes
        self.guard = Guard(tokens, self.limit, metrics.unauthenticated.inc)
        self.port = 0
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.limit, middlewares=[self._answers, self._guarded])
        app.router.add_get("/", self.page)
        app.router.add_static("/static", STATIC, append_version=False)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/classify", self.classify, expect_handler=self._expect)
        app.router.add_post("/v1/embeddings", self.embeddings, expect_handler=self._expect)
        return app

    async def start(self) -> int:
        # Its calls in flight are admission's, drained (or ended) before `stop`.
        self._runner = web.AppRunner(self.application(), access_log=None, handle_signals=False,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.http_port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise Unavailable(f"cannot listen on {self.settings.host}:{self.settings.http_port} for the HTTP door "
                              f"({exc.strerror or exc}): choose another --http-port, or 0 to turn it off") from None
        self.port = self._runner.addresses[0][1]
        return self.port

    def refuse_new(self) -> None:
        """From now on every /v1/ call is UNAVAILABLE (503) and /healthz says so."""
        self.guard.closing = True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- middlewares ------------------------------------------------------------------

    @web.middleware
    async def _answers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method, a static file
            response = from_aiohttp(exc, self.limit)
        except CliploraError as exc:  # the door's own checks, before admission
            response = error_response(*to_status(exc, request.path))
        except CallAborted as exc:  # the service's answer, from the error table (413: RESOURCE_EXHAUSTED
            call = request.get(CALL)  # that was a body over the limit, not the concurrency limit's 429)
            too_large = call is not None and call.body_too_large
            response = error_response(exc.code, exc.message, HTTP_BODY_TOO_LARGE if too_large else None)
        except TimeoutError:
            response = error_response(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except Exception as exc:  # a bug of ours: INTERNAL, the details only in the log
            response = error_response(*to_status(exc, request.path))
        self._count(request, response)
        return response

    @web.middleware
    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = self.guard.refusal(request)
        return refusal if refusal is not None else await handler(request)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: the guard first, so a refused client does not send its
        body for nothing; an expectation the door cannot meet is 417."""
        refusal = self.guard.refusal(request)
        if refusal is None and request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            refusal = error_response(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"unknown Expect: {request.headers.get(hdrs.EXPECT)}", status=417)
        if refusal is not None:
            self._count(request, refusal)
            return refusal
        if request.version == HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    def _count(self, request: web.Request, response: web.StreamResponse) -> None:
        route = request.match_info.route.resource
        self.metrics.http_responses.labels(route.canonical if route is not None else "unmatched",
                                           str(response.status)).inc()

    # -- routes -----------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        response = web.FileResponse(STATIC / "index.html")
        response.headers[hdrs.CONTENT_SECURITY_POLICY] = PAGE_POLICY
        response.headers[hdrs.X_CONTENT_TYPE_OPTIONS] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        if self.guard.closing:
            return error_response(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.guard.closing or not self.health.serving:
            return error_response(grpc.StatusCode.UNAVAILABLE,
                                  SHUTTING_DOWN if self.guard.closing else "Triton is not ready")
        return web.json_response({"status": "ready"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi.document())

    async def models(self, request: web.Request) -> web.Response:
        call = _call(request)
        listed = await _within(call, self.service.list_models(call))
        return web.json_response({"object": "list", "data": [
            {"id": info.name, "object": "model", "created": 0, "owned_by": "cliplora", **convert.message_json(info)}
            for info in listed.models]})

    async def classify(self, request: web.Request) -> web.Response:
        call = _call(request)
        made: list[convert.ClassifyCall] = []

        async def parse() -> Any:  # once admitted: the body is read and parsed here
            if request.content_type == "multipart/form-data":
                made.append(convert.classify_from_form(await self._read(call, read_form(
                    request, self.limit, self.settings.max_form_parts))))
            elif request.content_type in JSON_TYPES:
                made.append(await self._parse(convert.classify_from_json, await self._read(call, read_body(
                    request, self.limit))))
            else:
                raise InvalidArgument(f"send application/json or multipart/form-data, not {request.content_type}")
            return made[0].request

        response = await _within(call, self.service.classify(parse, call))
        return web.json_response(convert.classify_answer(response, made[0].names), headers={
            "Cliplora-Model": response.model, "Cliplora-Version": str(response.version),
            "Cliplora-Adapter": response.adapter})

    async def embeddings(self, request: web.Request) -> web.Response:
        call = _call(request)
        made: list[convert.EmbeddingsCall] = []

        async def parse() -> Any:
            if request.content_type not in JSON_TYPES:
                raise InvalidArgument(f"send application/json, not {request.content_type}")
            body = await self._read(call, read_body(request, self.limit))
            made.append(await self._parse(convert.embeddings_from_json, body))
            return made[0].request

        response = await _within(call, self.service.embed(parse, call))
        tokens = await asyncio.get_running_loop().run_in_executor(self.pool, _prompt_tokens,
                                                                  list(made[0].request.texts))
        return web.json_response(convert.embeddings_answer(made[0], response, tokens))

    async def _read(self, call: HttpCall, reading: Awaitable[T]) -> T:
        """A body as `reading` reads it; over the limit, RESOURCE_EXHAUSTED answered 413."""
        try:
            return await reading
        except TooLarge:
            call.body_too_large = True
            raise ResourceExhausted(too_large_message(self.limit)) from None

    async def _parse(self, parse: Callable[[bytes], T], body: bytes) -> T:
        """`parse(body)`, in the pool for a large body: JSON and base64 of a batch of photos
        would hold the event loop (and every other call on it) for tens of milliseconds."""
        if len(body) <= OFFLOAD_BYTES:
            return parse(body)
        return await asyncio.get_running_loop().run_in_executor(self.pool, parse, body)


def _call(request: web.Request) -> HttpCall:
    """The call's context (its ``Request-Timeout``), kept on the request for `_answers`."""
    call = request[CALL] = HttpCall.from_header(request.headers.get(TIMEOUT_HEADER))
    return call


async def _within(call: HttpCall, work: Awaitable[T]) -> T:
    """`work` cut at the caller's deadline, as gRPC cuts a call at its own: admission then
    counts it DEADLINE_EXCEEDED, and the door answers 504."""
    async with asyncio.timeout(call.time_remaining()):
        return await work


def _prompt_tokens(texts: list[str]) -> int:
    """What the text tower read: each text's CLIP BPE tokens with its start and end tokens,
    cut at the context length as the text encoder cuts it."""
    if not texts:
        return 0
    tokenizer = get_tokenizer()
    return sum(min(len(tokenizer.encode(text)) + 2, contract.CONTEXT_LENGTH) for text in texts)
