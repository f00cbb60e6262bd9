"""The load loop: models interleaved request by request, warm-up excluded, bounded.

Closed loop (`concurrency` workers, each sending its next request when the last one
returns) or open loop (`rate` requests per second on a fixed schedule; latency counts
from the *scheduled* send time, so queueing in the client or server is not hidden).
Request i goes to ``models[i % len(models)]``: A, B, A, B, ..., so drift on a noisy
machine hits every model alike. The run stops by itself at `duration_s` (after the
warm-up) or at `max_requests` measured requests, whichever comes first.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from cliplora.loadtest.targets import RequestFailed, Target

MAX_OUTSTANDING = 10_000  # open loop: beyond this many unanswered requests, new ones count as dropped


@dataclass
class Record:
    model: str
    start: float  # seconds since the measured phase began
    latency: float  # seconds
    code: str  # "OK" or a status code name


@dataclass
class RunResult:
    models: list[str]
    records: list[Record] = field(default_factory=list)
    measured_seconds: float = 0.0
    warmup_seconds: float = 0.0
    mode: str = "closed"
    concurrency: int | None = None
    rate: float | None = None
    started_unix: float = 0.0
    ended_unix: float = 0.0

    def latencies(self, model: str) -> np.ndarray:
        return np.array([r.latency for r in self.records if r.model == model and r.code == "OK"])

    def errors(self, model: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            if r.model == model and r.code != "OK":
                counts[r.code] = counts.get(r.code, 0) + 1
        return counts


class _Progress:
    """A status line on stderr: rewritten every second on a terminal, a new line every 5 s elsewhere."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = 1.0 if self.tty else 5.0
        self.last = time.monotonic()

    def show(self, phase: str, elapsed: float, total: float, done: int, errors: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < self.interval:
            return
        self.last = now
        rps = done / max(elapsed, 1e-9)
        line = f"{phase}: {elapsed:5.1f}/{total:.0f} s, {done} measured requests ({rps:.1f}/s), {errors} errors"
        print(f"\r{line}   " if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


async def _send(target: Target, model: str, item: int) -> str:
    try:
        await target.send(model, item)
        return "OK"
    except RequestFailed as exc:
        return exc.code
    except TimeoutError:
        return "DEADLINE_EXCEEDED"


async def run_load(
    target: Target,
    models: list[str],
    *,
    concurrency: int = 1,
    rate: float | None = None,
    duration_s: float = 30.0,
    warmup_s: float = 5.0,
    max_requests: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Run the load against an already started `target`."""
    result = RunResult(models=list(models), warmup_seconds=warmup_s, mode="open" if rate else "closed",
                       concurrency=None if rate else concurrency, rate=rate)
    run = _Run(target, models, result, duration_s, warmup_s, max_requests, _Progress(progress))
    if rate is None:
        await run.closed_loop(concurrency)
    else:
        await run.open_loop(rate)
    run.ticker.done()
    result.measured_seconds = max(min(time.monotonic(), run.end) - run.measured_from, 1e-9)
    result.ended_unix = result.started_unix + result.measured_seconds
    return result


class _Run:
    """One run's clock, its request numbers and what it records: requests sent during the
    warm-up are not recorded, and recording stops at `max_requests`."""

    def __init__(self, target: Target, models: list[str], result: RunResult, duration_s: float, warmup_s: float,
                 max_requests: int | None, ticker: _Progress) -> None:
        self.target, self.models, self.result = target, models, result
        self.max_requests, self.ticker = max_requests, ticker
        self.begin = time.monotonic()
        self.measured_from = self.begin + warmup_s
        self.end = self.measured_from + duration_s
        self.total_s = warmup_s + duration_s
        result.started_unix = time.time() + warmup_s
        self.counter = itertools.count()
        self.errors = 0  # kept as requests end: counting the records each time is quadratic in the run

    def enough(self) -> bool:
        return self.max_requests is not None and len(self.result.records) >= self.max_requests

    def record(self, model: str, scheduled: float, code: str) -> None:
        now = time.monotonic()
        if scheduled >= self.measured_from and not self.enough():
            self.result.records.append(Record(model, scheduled - self.measured_from, now - scheduled, code))
            self.errors += code != "OK"
        phase = "warm-up" if now < self.measured_from else "load"
        self.ticker.show(phase, now - self.begin, self.total_s, len(self.result.records), self.errors)

    async def closed_loop(self, concurrency: int) -> None:
        """`concurrency` workers, each sending its next request when its last one is answered."""
        async def worker() -> None:
            while time.monotonic() < self.end and not self.enough():
                item = next(self.counter)
                model = self.models[item % len(self.models)]
                sent = time.monotonic()
                self.record(model, sent, await _send(self.target, model, item))

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def open_loop(self, rate: float) -> None:
        """Requests on a fixed schedule of `rate` per second, answered or not (at most
        MAX_OUTSTANDING in flight; the rest are DROPPED)."""
        outstanding: set[asyncio.Task[None]] = set()

        async def one(model: str, item: int, scheduled: float) -> None:
            self.record(model, scheduled, await _send(self.target, model, item))

        for item in self.counter:
            scheduled = self.begin + item / rate
            if scheduled >= self.end or self.enough():
                break
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            model = self.models[item % len(self.models)]
            if len(outstanding) >= MAX_OUTSTANDING:
                self.record(model, scheduled, "DROPPED")
                continue
            task = asyncio.create_task(one(model, item, scheduled))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        if outstanding:
            await asyncio.gather(*outstanding)
