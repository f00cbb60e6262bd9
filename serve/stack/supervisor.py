"""Supervision of the local stack's children (Triton, Prometheus) by `cliplora serve`.

A child that exits, never gets ready, or (with hang detection on) stops answering its
readiness URL for `hang_s` is SIGKILLed with everything it started (its guard's process
group) and started again on the same ports, after an exponential back-off: 1 s doubling to
30 s, back to 1 s once a run had been ready for 60 s. Every restart is logged with the exit
status or signal and counted in ``cliplora_stack_restarts_total{component}``. More than
`max_restarts` failures within `window_s` and the supervisor gives up: `run` raises
`Unavailable` naming the child's log, and `cliplora serve` exits non-zero.

The policy is a frozen value and `RestartHistory` does its arithmetic on times it is
given, so both are tested on a fake clock; `Supervisor` is the asyncio loop around them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from cliplora.core.errors import InvalidArgument, Unavailable
from cliplora.serve.stack.processes import GuardedChild, describe_exit, http_ok

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a child that failed, and when to stop trying."""

    max_restarts: int = 5  # restarts allowed within window_s; one more failure gives up
    window_s: float = 300.0
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    reset_after_s: float = 60.0  # a run ready this long resets the back-off

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise InvalidArgument(f"max_restarts must not be negative, got {self.max_restarts}")
        for name in ("window_s", "first_delay_s", "max_delay_s", "reset_after_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_delay_s < self.first_delay_s:
            raise InvalidArgument(f"max_delay_s ({self.max_delay_s}) is below first_delay_s ({self.first_delay_s})")

    def delay_s(self, failures_in_a_row: int) -> float:
        """The pause before restart number `failures_in_a_row` (1-based) of a streak."""
        return min(self.first_delay_s * 2.0 ** (max(failures_in_a_row, 1) - 1), self.max_delay_s)


@dataclass(frozen=True)
class ReadinessProbe:
    """How a running child is watched: its readiness URL every `interval_s`, each try cut
    at `timeout_s`; no ready answer for `hang_s` (0: never) means hung."""

    interval_s: float = 0.5
    timeout_s: float = 1.0
    hang_s: float = 15.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise InvalidArgument(f"the probe's health_interval_s and health_timeout_s must be positive, "
                                  f"got {self.interval_s:g} and {self.timeout_s:g}")
        if self.hang_s < 0:
            raise InvalidArgument(f"triton_hang_s must not be negative (0: off), got {self.hang_s}")
        if 0 < self.hang_s < self.timeout_s + self.interval_s:
            raise InvalidArgument(f"triton_hang_s ({self.hang_s:g} s) must be at least one probe "
                                  f"({self.timeout_s + self.interval_s:g} s), or 0 for off")


class RestartHistory:
    """The failures of one child, against a `RestartPolicy`; times are ``time.monotonic()``
    values passed in, never read here."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.failures: deque[float] = deque()  # within the window only
        self.in_a_row = 0
        self.ready_at: float | None = None  # when the current run first answered ready

    def became_ready(self, now: float) -> None:
        if self.ready_at is None:
            self.ready_at = now

    def failed(self, now: float) -> float | None:
        """Record a failure; the pause before the restart, or None: give up."""
        if self.ready_at is not None and now - self.ready_at >= self.policy.reset_after_s:
            self.in_a_row = 0
        self.ready_at = None
        self.in_a_row += 1
        self.failures.append(now)
        while self.failures and self.failures[0] <= now - self.policy.window_s:
            self.failures.popleft()
        if len(self.failures) > self.policy.max_restarts:
            return None
        return self.policy.delay_s(self.in_a_row)


class Supervisor:
    """Keeps one child running; `run` until `request_stop`, then `stop_child`."""

    def __init__(self, child: GuardedChild, policy: RestartPolicy, probe: ReadinessProbe, restarts: Counter,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.child = child
        self.policy = policy
        self.probe = probe
        self.history = RestartHistory(policy)
        self.restarts = restarts.labels(component=child.name)  # the series exists from the start, at 0
        self.clock = clock
        self.ready = asyncio.Event()  # set while the current run has answered ready
        self.settled = asyncio.Event()  # the first run got ready or failed: the stack may go on
        self._stopping = asyncio.Event()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop_child(self) -> None:
        """SIGTERM (it drains), its group SIGKILLed after its grace period; off the loop."""
        await asyncio.to_thread(self.child.stop)

    async def run(self) -> None:
        """Start, watch, restart, until `request_stop` (returns) or the limit (raises)."""
        name = self.child.name
        while not self._stopping.is_set():
            try:
                self.child.launch()
            except OSError as exc:
                reason = f"could not be started: {exc}"
            else:
                reason = await self._watch()
            if self._stopping.is_set():
                return
            self.ready.clear()
            await asyncio.to_thread(self.child.kill_group)  # its stubs too, whatever state they are in
            delay = self.history.failed(self.clock())
            self.settled.set()
            if delay is None:
                log.error("%s %s; giving up (more than %d restarts within %.0f s); see %s", name, reason,
                          self.policy.max_restarts, self.policy.window_s, self.child.log_path)
                raise Unavailable(f"{name} failed {len(self.history.failures)} times within "
                                  f"{self.policy.window_s:.0f} s (last: {reason}); gave up after "
                                  f"{self.policy.max_restarts} restarts. See {self.child.log_path}")
            log.warning("%s %s; restarting it in %.0f s (failure %d of at most %d within %.0f s; log: %s)", name,
                        reason, delay, len(self.history.failures), self.policy.max_restarts + 1, self.policy.window_s,
                        self.child.log_path)
            if await self._sleep(delay):
                return
            self.restarts.inc()
            log.info("restarting %s", name)

    async def _watch(self) -> str:
        """Until the child fails (returns why) or a stop is requested."""
        started = last_ready = self.clock()
        process = self.child.process
        assert process is not None, "launch() sets process"
        while not self._stopping.is_set():
            if process.poll() is not None:
                return describe_exit(process.returncode)
            probing = not self.ready.is_set() or self.probe.hang_s > 0
            answered = probing and await asyncio.to_thread(http_ok, self.child.ready_url, self.probe.timeout_s)
            now = self.clock()
            if answered:
                last_ready = now
                if not self.ready.is_set():
                    self.history.became_ready(now)
                    self.ready.set()
                    self.settled.set()
                    log.info("%s ready after %.1f s", self.child.name, now - started)
            elif not self.ready.is_set() and now - started > self.child.start_timeout_s:
                return f"was not ready after {self.child.start_timeout_s:.0f} s"
            elif self.ready.is_set() and self.probe.hang_s and now - last_ready >= self.probe.hang_s:
                if process.poll() is not None:
                    continue  # it died meanwhile: say so, not "hung"
                return (f"hung: no answer from {self.child.ready_url} for {now - last_ready:.1f} s "
                        f"(limit {self.probe.hang_s:g} s); killed it with its process group")
            await self._sleep(self.probe.interval_s)
        return "stopping"

    async def _sleep(self, seconds: float) -> bool:
        """Sleep `seconds`, or less when a stop is requested; True if it was."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True
