"""The gateway's worker threads, sized to the machine, with their queue in the metrics.

Decoding a JPEG is CPU work in C, and Pillow releases the GIL while it decodes and
resizes, so one thread per core decodes on every core at once; more threads only
queue inside the kernel, fewer leave cores idle. By default the pool has one thread per
core this process may use: the CPU affinity mask, capped by the container's CPU quota
(cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), so that a gateway limited to 2 CPUs
on a 64-core node does not start 64 threads.

What waits for a thread is visible: ``cliplora_gateway_preprocess_pool_queued`` (tasks
submitted and not started), ``..._pool_busy`` (threads working), ``..._pool_workers``
(the pool's size), ``..._pool_wait_seconds`` (time from submission to start) and
``..._pool_cpu_seconds_total`` (CPU time of the tasks: images decoded per second per
core is the preprocessing histogram's count over it, whatever else shares the machine).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from cliplora.serve.gateway.metrics import GatewayMetrics

T = TypeVar("T")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The cores the container's CPU quota allows (rounded up), None without a quota."""
    try:
        quota, _, period = (cgroup_root / "cpu.max").read_text().partition(" ")  # v2: "max 100000" or "200000 100000"
        if quota.strip() != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 without a quota
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may run on: its affinity mask, capped by a CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(cgroup_root)
    return max(1, min(cores, quota) if quota is not None else cores)


class DecodePool(ThreadPoolExecutor):
    """A thread pool whose queue, busy threads and CPU time are gateway metrics.

    Everything `loop.run_in_executor` sends goes through `submit`, so images and the
    text encoder's tokenizing are counted alike."""

    def __init__(self, workers: int, metrics: GatewayMetrics) -> None:
        super().__init__(workers, thread_name_prefix="preprocess")
        self.metrics = metrics
        metrics.pool_workers.set(workers)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        metrics = self.metrics
        submitted = time.perf_counter()

        def tracked() -> T:
            metrics.pool_queued.dec()
            metrics.pool_wait.observe(time.perf_counter() - submitted)
            metrics.pool_busy.inc()
            cpu = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                metrics.pool_cpu.inc(time.thread_time() - cpu)
                metrics.pool_busy.dec()

        metrics.pool_queued.inc()
        try:
            future = super().submit(tracked)
        except BaseException:  # shut down: nothing was queued
            metrics.pool_queued.dec()
            raise
        # A task cancelled before it started (its caller gave up, or shutdown) leaves the queue too.
        future.add_done_callback(lambda f: metrics.pool_queued.dec() if f.cancelled() else None)
        return future
