"""What every ``/v1/`` call of the HTTP door passes before its body is read: not shutting
down, not from another site's page, with a valid bearer token when tokens are set, and
no declared body over the limit. Run as a middleware and, for ``Expect: 100-continue``,
before the client is told to send its body (`cliplora.serve.gateway.web.app`)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from aiohttp import hdrs, web

from cliplora.serve.gateway.security import bearer_token, token_matches
from cliplora.serve.gateway.web.responses import SHUTTING_DOWN, error_response, too_large

API_PREFIX = "/v1/"


class Guard:
    def __init__(self, tokens: tuple[bytes, ...], limit: int, on_unauthenticated: Callable[[], None]) -> None:
        self.tokens = tokens
        self.limit = limit
        self.on_unauthenticated = on_unauthenticated
        self.closing = False

    def refusal(self, request: web.Request) -> web.Response | None:
        """The answer that refuses `request`, or None to let it in."""
        if not request.path.startswith(API_PREFIX):
            return None
        if self.closing:
            return error_response(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not same_site(origin, request):
            return error_response(grpc.StatusCode.PERMISSION_DENIED,
                                  f"cross-origin calls are refused: a page at {origin} cannot call this door")
        if self.tokens and not token_matches(bearer_token(request.headers.get(hdrs.AUTHORIZATION)), self.tokens):
            self.on_unauthenticated()
            return error_response(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if request.content_length is not None and request.content_length > self.limit:
            return too_large(self.limit)
        return None


def same_site(origin: str, request: web.Request) -> bool:
    """Whether a browser's ``Origin`` names the host the call was sent to: the ``Host``
    header or a proxy's ``X-Forwarded-Host`` (a page elsewhere cannot set that header without
    a preflight the door never grants). The scheme is not compared (a proxy that ends TLS
    turns https into http), nor the port when the proxy's Host carries none (nginx's
    ``$host``)."""
    _, sep, netloc = origin.partition("://")
    if not sep:
        return False  # "null": a sandboxed page or a file
    asked = _host_port(netloc)
    forwarded = [host for value in request.headers.getall(hdrs.X_FORWARDED_HOST, []) for host in value.split(",")]
    for host, port in (_host_port(value) for value in (request.host, *forwarded)):
        if host == asked[0] and (port is None or port == asked[1]):
            return True
    return False


def _host_port(value: str) -> tuple[str, str | None]:
    """("host", "port" or None) of ``host[:port]`` or ``[v6]:port``, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    host, colon, port = value.rpartition(":")
    return (host, port) if colon and port.isdigit() else (value, None)
