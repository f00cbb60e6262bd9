"""One HTTP call as the handlers see a call: a deadline and a way to end it with a status
(`cliplora.serve.gateway.admission.CallContext`, which gRPC's context also is)."""

from __future__ import annotations

import math
import time
from typing import NoReturn

import grpc

from cliplora.core.errors import InvalidArgument

TIMEOUT_HEADER = "Request-Timeout"  # seconds, like gRPC's grpc-timeout; none: the gateway's default


class CallAborted(Exception):
    """The service ended the call with this status (raised by `HttpCall.abort`)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HttpCall:
    """The deadline the caller asked for (``Request-Timeout``), or none."""

    def __init__(self, timeout_s: float | None) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.body_too_large = False  # the door's reader found the body over its limit (answered 413)

    @classmethod
    def from_header(cls, value: str | None) -> HttpCall:
        """InvalidArgument for a header that is not a positive number of seconds."""
        if value is None:
            return cls(None)
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise InvalidArgument(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {value!r}")
        return cls(seconds)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise CallAborted(code, details)
