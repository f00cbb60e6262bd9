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
    ticker = _Progress(progress)
    clock = time.monotonic
    begin = clock()
    measured_from = begin + warmup_s
    end = measured_from + duration_s
    result.started_unix = time.time() + warmup_s
    counter = itertools.count()
    errors = 0  # kept as requests end: counting the records each time is quadratic in the run

    def enough() -> bool:
        return max_requests is not None and len(result.records) >= max_requests

    def record(model: str, scheduled: float, code: str) -> None:
        nonlocal errors
        if scheduled >= measured_from and not enough():
            result.records.append(Record(model, scheduled - measured_from, clock() - scheduled, code))
            errors += code != "OK"
        elapsed = clock() - begin
        phase = "warm-up" if clock() < measured_from else "load"
        ticker.show(phase, elapsed, warmup_s + duration_s, len(result.records), errors)

    if rate is None:
        async def worker() -> None:
            while clock() < end and not enough():
                item = next(counter)
                model = models[item % len(models)]
                sent = clock()
                record(model, sent, await _send(target, model, item))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        outstanding: set[asyncio.Task[None]] = set()

        async def one(model: str, item: int, scheduled: float) -> None:
            record(model, scheduled, await _send(target, model, item))

        for item in counter:
            scheduled = begin + item / rate
            if scheduled >= end or enough():
                break
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            model = models[item % len(models)]
            if len(outstanding) >= MAX_OUTSTANDING:
                record(model, scheduled, "DROPPED")
                continue
            task = asyncio.create_task(one(model, item, scheduled))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        if outstanding:
            await asyncio.gather(*outstanding)
    ticker.done()
    result.measured_seconds = max(min(clock(), end) - measured_from, 1e-9)
    result.ended_unix = result.started_unix + result.measured_seconds
    return result
