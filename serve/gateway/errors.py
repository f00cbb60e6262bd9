"""The one error -> status mapping, for both doors (the README's error table).

| fault | gRPC status | HTTP |
|---|---|---|
| undecodable / oversized image, too many images, bad top_k, bad name, malformed body | INVALID_ARGUMENT | 400 |
| missing or invalid bearer token | UNAUTHENTICATED | 401 |
| an HTTP call from another site's page (its Origin is not the door's) | PERMISSION_DENIED | 403 |
| unknown model or version (HTTP: also an unknown path) | NOT_FOUND | 404 |
| labels / Embed on a model without a text encoder; another BPE vocabulary | FAILED_PRECONDITION | 409 |
| an HTTP body over the limit (gRPC: a message over it) | RESOURCE_EXHAUSTED | 413 |
| over the concurrency limit | RESOURCE_EXHAUSTED | 429 |
| Triton down or unreachable; shutting down (a call still running when the grace period ends) | UNAVAILABLE | 503 |
| the caller's deadline passed | DEADLINE_EXCEEDED | 504 |
| anything else | INTERNAL, details only in the log | 500 |

Domain errors (`cliplora.core.errors`) carry their code's name; Triton client errors are
translated here; every other exception is a bug and becomes INTERNAL with an id the
log also shows. The HTTP door answers ``{"error": {"code": <status name>, "message"}}``
with `http_status` of the code (413 for an oversized body is the door's own: the same
code, RESOURCE_EXHAUSTED, means overload everywhere else).
"""

from __future__ import annotations

import logging
import uuid

import grpc
from tritonclient.utils import InferenceServerException

from cliplora.core.errors import (
    CliploraError,
    DeadlineExceeded,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

_TRITON_CODES: dict[str, type[CliploraError]] = {
    "StatusCode.UNAVAILABLE": Unavailable,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
    "StatusCode.NOT_FOUND": NotFound,
    "StatusCode.RESOURCE_EXHAUSTED": ResourceExhausted,
    "StatusCode.CANCELLED": Unavailable,
}


class VersionNotReady(Unavailable):
    """Triton has the model but not (or no longer) the version asked for ready: a version
    being unloaded after its successor loaded. A call pinned to it is resolved again."""


class NotLoadedTogether(Unavailable):
    """Triton has a model ready but not yet, at the same version, the model it is served
    with (a bank's adapter table or text encoder, a classifier's text encoder): the moment
    between the two loads of one publish. The lookup waits a little for the second load
    (`cliplora.serve.gateway.triton.LOADS_WAIT_S`) before answering UNAVAILABLE."""


def from_triton(exc: InferenceServerException, model: str) -> CliploraError | None:
    """The domain error a Triton client error means, or None if it means a bug of ours."""
    status = str(exc.status() or "")
    message = str(exc.message() or "")
    if "unknown model" in message.lower() and "not at ready state" in message.lower():
        return VersionNotReady(f"Triton: {message}")
    if status in _TRITON_CODES:
        error = _TRITON_CODES[status]
        if error is Unavailable:
            return Unavailable(f"Triton is unavailable: {message}")
        if error is DeadlineExceeded:
            return DeadlineExceeded(f"deadline exceeded while {model} was running")
        return error(f"Triton: {message}")
    lowered = message.lower()
    if "unknown model" in lowered or "is not found" in lowered or "not ready" in lowered:
        return NotFound(f"model {model} is not available in Triton: {message}")
    if "connect" in lowered or "socket closed" in lowered:
        return Unavailable(f"Triton is unavailable: {message}")
    return None


_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # the caller went away: nobody reads it, the access log does
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
HTTP_BODY_TOO_LARGE = 413


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status the door answers a gRPC status code with (500 for the rest:
    INTERNAL, UNKNOWN, DATA_LOSS)."""
    return _HTTP_STATUS.get(code, 500)


def to_status(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """(status code, message for the caller) for any exception raised by a handler."""
    if isinstance(exc, CliploraError):
        return grpc.StatusCode[exc.code], str(exc)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error in %s (incident %s)", method, incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}; details in the gateway log)"
