"""The HTTP door's error answers: ``{"error": {"code", "message"}}`` with the status the
one table gives its code (`cliplora.serve.gateway.errors.http_status`), for the guard, the
routes and aiohttp's own refusals alike."""

from __future__ import annotations

import grpc
from aiohttp import hdrs, web

from cliplora.serve.gateway.errors import HTTP_BODY_TOO_LARGE, http_status

SHUTTING_DOWN = "the gateway is shutting down"

# aiohttp's own refusals (a static file, a header it will not take) by HTTP status; the rest:
# INVALID_ARGUMENT below 500, INTERNAL above.
_AIOHTTP_CODES = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
                  404: grpc.StatusCode.NOT_FOUND, HTTP_BODY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED}


def error_response(code: grpc.StatusCode, message: str, status: int | None = None) -> web.Response:
    """The door's error body, with the status the table gives `code` (or `status`)."""
    response = web.json_response({"error": {"code": code.name, "message": message}},
                                 status=http_status(code) if status is None else status)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and response.status == 429:
        response.headers[hdrs.RETRY_AFTER] = "1"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        response.headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
    return response


def too_large_message(limit: int) -> str:
    return (f"the request body is over the limit of {limit} bytes (the gateway's --max-images x "
            "--max-image-bytes, base64-encoded)")


def too_large(limit: int) -> web.Response:
    """413: RESOURCE_EXHAUSTED that is a body over the limit, not the concurrency limit's 429."""
    return error_response(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large_message(limit), status=HTTP_BODY_TOO_LARGE)


def from_aiohttp(exc: web.HTTPException, limit: int) -> web.Response:
    """aiohttp's own refusals as the door's JSON, with their HTTP status."""
    if isinstance(exc, web.HTTPNotFound):
        return error_response(grpc.StatusCode.NOT_FOUND, "no such path: GET /openapi.json lists them")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return too_large(limit)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ",".join(sorted(exc.allowed_methods))
        response = error_response(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.method} is not allowed here; allowed: "
                                  f"{allowed}", status=405)
        response.headers[hdrs.ALLOW] = allowed
        return response
    code = _AIOHTTP_CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT if exc.status < 500
                              else grpc.StatusCode.INTERNAL)
    return error_response(code, exc.reason, status=exc.status)
