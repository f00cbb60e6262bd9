"""The HTTP door's routes and guards, served by aiohttp on the gateway's own event loop.

Every answer goes through `_answers` (errors as ``{"error": {"code", "message"}}`` with
the status of the one table, `cliplora.serve.gateway.errors.http_status`; the
``cliplora_gateway_http_responses_total`` counter), and every ``/v1/`` call through
`_guard` first: refused while shutting down, from another site's page (its ``Origin``),
without a valid bearer token when tokens are set, or with a declared body over the limit.
The body is read within ``client_max_size`` (aiohttp stops reading past it), then turned
into the gRPC message *inside* admission (`ClassifierService.classify`), so the
concurrency limit, the deadline, the request histogram and the error table are gRPC's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from aiohttp import hdrs, web

from cliplora.core import contract
from cliplora.core.errors import CliploraError, InvalidArgument, Unavailable
from cliplora.core.tokenizer import get_tokenizer
from cliplora.serve.gateway.errors import HTTP_BODY_TOO_LARGE, http_status, to_status
from cliplora.serve.gateway.health import TritonHealth
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.security import bearer_token, token_matches
from cliplora.serve.gateway.service import ClassifierService
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.gateway.web import convert, openapi
from cliplora.serve.gateway.web.calls import TIMEOUT_HEADER, CallAborted, HttpCall
from cliplora.serve.gateway.web.forms import TooLarge, read_form

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
API_PREFIX = "/v1/"
SHUTDOWN_TIMEOUT_S = 1.0
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(code: grpc.StatusCode, message: str, status: int | None = None) -> web.Response:
    """The door's error body, with the status the table gives `code` (or `status`)."""
    response = web.json_response({"error": {"code": code.name, "message": message}},
                                 status=http_status(code) if status is None else status)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and response.status == 429:
        response.headers[hdrs.RETRY_AFTER] = "1"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        response.headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
    return response


class HttpDoor:
    """`start()` binds ``--host:--http-port``; `refuse_new()` then `stop()` at shutdown
    (the calls in flight are admission's, drained with gRPC's)."""

    def __init__(self, settings: GatewaySettings, service: ClassifierService, health: TritonHealth,
                 metrics: GatewayMetrics, pool: Executor, tokens: tuple[bytes, ...],
                 ssl_context: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.pool = pool
        self.service = service
        self.health = health
        self.metrics = metrics
        self.tokens = tokens
        self.ssl_context = ssl_context
        self.port = 0
        self.closing = False
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_http_body_bytes,
                              middlewares=[self._answers, self._guard])
        app.router.add_get("/", self.page)
        app.router.add_static("/static", STATIC, append_version=False)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/classify", self.classify)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def start(self) -> int:
        # Its calls in flight are admission's, drained (or ended) before `stop`: what is left
        # then (a body still arriving) gets SHUTDOWN_TIMEOUT_S.
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
        self.closing = True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- middlewares ------------------------------------------------------------------

    @web.middleware
    async def _answers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method, body too large
            response = _from_aiohttp(exc, self.settings.max_http_body_bytes)
        except CliploraError as exc:  # the door's own checks, before admission
            response = error_response(*to_status(exc, request.path))
        except CallAborted as exc:  # the service's answer, from the error table
            response = error_response(exc.code, exc.message)
        except TimeoutError:
            response = error_response(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except Exception as exc:  # a bug of ours: INTERNAL, the details only in the log
            response = error_response(*to_status(exc, request.path))
        route = request.match_info.route.resource
        self.metrics.http_responses.labels(route.canonical if route is not None else "unmatched",
                                           str(response.status)).inc()
        return response

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX):
            return await handler(request)
        if self.closing:
            return error_response(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not _same_site(origin, request):
            return error_response(grpc.StatusCode.PERMISSION_DENIED,
                                  f"cross-origin calls are refused: a page at {origin} cannot call this door")
        if self.tokens and not token_matches(bearer_token(request.headers.get(hdrs.AUTHORIZATION)), self.tokens):
            self.metrics.unauthenticated.inc()
            return error_response(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        limit = self.settings.max_http_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit)
        return await handler(request)

    # -- routes -----------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        response = web.FileResponse(STATIC / "index.html")
        response.headers[hdrs.CONTENT_SECURITY_POLICY] = PAGE_POLICY
        response.headers[hdrs.X_CONTENT_TYPE_OPTIONS] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    async def healthz(self, request: web.Request) -> web.Response:
        if self.closing:
            return error_response(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.closing or not self.health.serving:
            return error_response(grpc.StatusCode.UNAVAILABLE, "Triton is not ready" if not self.closing
                                  else "the gateway is shutting down")
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
        if request.content_type == "multipart/form-data":
            try:
                form = await read_form(request, self.settings.max_http_body_bytes)
            except TooLarge:
                return _too_large(self.settings.max_http_body_bytes)
            parsed = Parsed(lambda: convert.classify_from_form(form))
        elif request.content_type in ("application/json", "application/octet-stream", ""):
            body = await request.read()
            parsed = Parsed(lambda: convert.classify_from_json(body))
        else:
            raise InvalidArgument(f"send application/json or multipart/form-data, not {request.content_type}")
        response = await _within(call, self.service.classify(lambda: parsed().request, call))
        return web.json_response(convert.classify_answer(response, parsed.value.names), headers={
            "Cliplora-Model": response.model, "Cliplora-Version": str(response.version),
            "Cliplora-Adapter": response.adapter})

    async def embeddings(self, request: web.Request) -> web.Response:
        call = _call(request)
        body = await request.read()
        parsed = Parsed(lambda: convert.embeddings_from_json(body))
        response = await _within(call, self.service.embed(lambda: parsed().request, call))
        texts = list(parsed.value.request.texts)
        tokens = await asyncio.get_running_loop().run_in_executor(self.pool, _prompt_tokens, texts)
        return web.json_response(convert.embeddings_answer(parsed.value, response, tokens))


class Parsed(Generic[T]):
    """A body's parse, run by admission (`ClassifierService.classify`), its result kept
    for the answer (image names, the order of OpenAI inputs)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None

    def __call__(self) -> T:
        self._value = self._build()
        return self._value

    @property
    def value(self) -> T:
        assert self._value is not None, "parsed before the service answered"
        return self._value


def _call(request: web.Request) -> HttpCall:
    return HttpCall.from_header(request.headers.get(TIMEOUT_HEADER))


async def _within(call: HttpCall, work: Awaitable[Any]) -> Any:
    """`work` cut at the caller's deadline, as gRPC cuts a call at its own: admission then
    counts it DEADLINE_EXCEEDED, and the door answers 504."""
    remaining = call.time_remaining()
    async with asyncio.timeout(remaining):
        return await work


def _prompt_tokens(texts: list[str]) -> int:
    """What the text tower read: each text's CLIP BPE tokens with its start and end tokens,
    cut at the context length as the text encoder cuts it."""
    if not texts:
        return 0
    tokenizer = get_tokenizer()
    return sum(min(len(tokenizer.encode(text)) + 2, contract.CONTEXT_LENGTH) for text in texts)


def _same_site(origin: str, request: web.Request) -> bool:
    """Whether a browser's ``Origin`` names the host it sent the call to: the ``Host``
    header, or a proxy's ``X-Forwarded-Host`` (which a page elsewhere cannot set without a
    preflight the door never grants). The scheme is not compared: a proxy that ends TLS
    in front of the door turns https into http."""
    _, sep, netloc = origin.partition("://")
    hosts = {request.host, *request.headers.getall(hdrs.X_FORWARDED_HOST, [])}
    return bool(sep) and netloc.lower() in {host.strip().lower() for host in hosts}


def _too_large(limit: int) -> web.Response:
    return error_response(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the request body is over the limit of {limit} bytes (the gateway's --max-images "
                          "x --max-image-bytes, base64-encoded)", status=HTTP_BODY_TOO_LARGE)


def _from_aiohttp(exc: web.HTTPException, limit: int) -> web.Response:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _too_large(limit)
    if isinstance(exc, web.HTTPNotFound):
        return error_response(grpc.StatusCode.NOT_FOUND, "no such path: GET /openapi.json lists them")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response = error_response(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{exc.method} is not allowed here; allowed: {', '.join(sorted(exc.allowed_methods))}",
                                  status=405)
        response.headers[hdrs.ALLOW] = ",".join(sorted(exc.allowed_methods))
        return response
    code = grpc.StatusCode.INVALID_ARGUMENT if 400 <= exc.status < 500 else grpc.StatusCode.INTERNAL
    return error_response(code, exc.reason, status=exc.status)
