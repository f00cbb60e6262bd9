"""Admission around every call: the concurrency limit, the request metrics, the error
table, and the drain at shutdown.

Beyond `max_concurrent` calls in flight the gateway answers RESOURCE_EXHAUSTED at once
instead of queueing without bound. Every call is observed once in
``cliplora_gateway_request_duration_seconds`` with the model and version its handler
resolved (``metric_labels``) and the status it ended with; every exception goes through
the one error table (`cliplora.serve.gateway.errors`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn, Protocol, TypeVar

import grpc

from cliplora.core.errors import ResourceExhausted, Unavailable
from cliplora.serve.gateway.errors import to_status
from cliplora.serve.gateway.metrics import UNKNOWN, GatewayMetrics

log = logging.getLogger(__name__)
DEADLINE_SLACK_S = 0.1
T = TypeVar("T")
MetricLabels = dict[str, str]  # "model", "version": what the request's histogram series is labelled with
Work = Callable[[MetricLabels], Awaitable[T]]


class CallContext(Protocol):
    """What admission and the handlers need of a call, whichever door it came through:
    gRPC's ``ServicerContext``, or the HTTP door's (`cliplora.serve.gateway.web.calls`)."""

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline; None when it set none."""

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the call with this status (raises)."""


class Admission:
    """Runs each call's work under the limit; `drain` ends what is left at shutdown."""

    def __init__(self, max_concurrent: int, metrics: GatewayMetrics) -> None:
        self.max_concurrent = max_concurrent
        self.metrics = metrics
        self.in_flight = 0
        self.accepted = 0  # calls admitted past the concurrency limit, ever
        self._calls: set[asyncio.Future[object]] = set()  # the work of the calls in flight

    async def run(self, method: str, context: CallContext, work: Work[T]) -> T:
        """The call's answer, or an abort with the status the error table gives.

        The work runs as a task of its own, so that `drain` can end it when the shutdown's
        grace period is over and the caller still hears UNAVAILABLE (not a bare CANCELLED).
        A call gRPC cancels itself is counted as DEADLINE_EXCEEDED when its deadline had
        passed (what the caller sees), CANCELLED otherwise.
        """
        start = time.perf_counter()
        metric_labels: MetricLabels = {"model": UNKNOWN, "version": ""}
        code = grpc.StatusCode.OK
        message = ""
        if self.in_flight >= self.max_concurrent:
            self.metrics.rejected.inc()
            code, message = to_status(ResourceExhausted(
                f"gateway busy: {self.in_flight} requests in flight (limit {self.max_concurrent})"), method)
            self._observe(method, metric_labels, code, start)
        else:
            self.in_flight += 1
            self.accepted += 1
            self.metrics.in_flight.inc()
            task = asyncio.ensure_future(work(metric_labels))
            self._calls.add(task)
            try:
                return await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():  # gRPC ended the call: deadline or the caller
                    # The caller's own deadline fires a little before ours (ours started when the
                    # call arrived), and its cancellation reaches us first: within DEADLINE_SLACK_S
                    # of our deadline it is the deadline that ended the call.
                    remaining = context.time_remaining()
                    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                    raise
                code, message = to_status(Unavailable(
                    "the gateway is shutting down and the call did not finish within its grace period"), method)
            except Exception as exc:  # the error table decides; INTERNAL hides details
                code, message = to_status(exc, method)
            finally:
                self._calls.discard(task)
                self._observe(method, metric_labels, code, start)  # before the slot is seen free
                self.in_flight -= 1
                self.metrics.in_flight.dec()
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for the calls in flight; end the rest (UNAVAILABLE).
        Returns how many were cut."""
        deadline = time.monotonic() + grace_s
        while self._calls and time.monotonic() < deadline:
            await asyncio.wait(set(self._calls), timeout=deadline - time.monotonic())
        cut = list(self._calls)
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.gather(*cut, return_exceptions=True)
            log.warning("grace period of %.1f s over: %d calls in flight ended with UNAVAILABLE", grace_s, len(cut))
        return len(cut)

    def _observe(self, method: str, metric_labels: MetricLabels, code: grpc.StatusCode, start: float) -> None:
        self.metrics.requests.labels(metric_labels["model"], metric_labels["version"], method, code.name).observe(
            time.perf_counter() - start)
