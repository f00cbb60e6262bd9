"""Access control for the gateway: optional TLS (mutual TLS optional) and bearer tokens.

Tokens come from a file (one per line; blank lines and ``#`` comments ignored) and/or
``CLIPLORA_AUTH_TOKENS`` (comma-separated). With tokens configured, every call except
``grpc.health.v1.Health`` (probes must reach it) needs ``authorization: Bearer <token>``
(the scheme in any case);
anything else is UNAUTHENTICATED. Tokens are compared in constant time, against every
configured token, so timing says nothing about how close a guess was.
"""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from cliplora.core.errors import InvalidArgument, NotFound

TOKENS_ENV = "CLIPLORA_AUTH_TOKENS"
OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"


def load_tokens(path: Path | None, environ: dict[str, str] | None = None) -> tuple[bytes, ...]:
    environ = dict(os.environ) if environ is None else environ
    tokens: list[str] = [t.strip() for t in environ.get(TOKENS_ENV, "").split(",") if t.strip()]
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise NotFound(f"token file not found: {path}") from None
        tokens += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for token in tokens:
        if len(token) < 16 or any(c.isspace() for c in token):
            raise InvalidArgument("auth tokens must be at least 16 characters without spaces")
    return tuple(t.encode() for t in tokens)


def bearer_token(header: object) -> bytes:
    """The token of an ``authorization: Bearer <token>`` value, b"" for anything else.

    The scheme is case-insensitive (RFC 7235: ``bearer``, ``BEARER``), and whitespace around
    the value or between scheme and token is not part of the token.
    """
    if not isinstance(header, str):
        return b""
    parts = header.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return b""
    # surrogateescape: an HTTP header with bytes that are not UTF-8 (aiohttp keeps them as
    # surrogates) is simply a token that matches nothing.
    return parts[1].strip().encode("utf-8", "surrogateescape")


def token_matches(presented: bytes, tokens: tuple[bytes, ...]) -> bool:
    """Constant time per token, and every token is compared (no early exit)."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented, token)
    return matched


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: tuple[bytes, ...], on_reject: Callable[[], None] | None = None) -> None:
        self.tokens = tokens
        self.on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_METHODS_PREFIX):
            return await continuation(details)
        presented = bearer_token(dict(details.invocation_metadata or ()).get("authorization", ""))
        if presented and token_matches(presented, self.tokens):
            return await continuation(details)
        if self.on_reject:
            self.on_reject()
        return _REJECT


async def _unauthenticated(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


_REJECT = grpc.unary_unary_rpc_method_handler(_unauthenticated)


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials; with `client_ca`, clients must present a certificate it signed."""
    try:
        pair = (Path(key).read_bytes(), Path(cert).read_bytes())
        ca = Path(client_ca).read_bytes() if client_ca else None
    except FileNotFoundError as exc:
        raise NotFound(f"TLS file not found: {exc.filename}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def http_ssl_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The HTTP door's TLS, from the same files as gRPC's (`server_credentials`): with
    `client_ca`, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except FileNotFoundError as exc:
        raise NotFound(f"TLS file not found: {exc.filename}") from None
    except ssl.SSLError as exc:
        raise InvalidArgument(f"cannot use the TLS files for HTTP: {exc}") from None
    return context
