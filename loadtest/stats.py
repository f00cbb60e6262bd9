"""Latency statistics and ratios with bootstrap confidence intervals.

Interleaved runs offer every model the same requests, so per-model throughput in one
run is equal by construction; the throughput *ratio* is therefore estimated as the
ratio of service rates, ``mean_latency(first) / mean_latency(model)``: how many requests
per second the model would sustain relative to the first, under the same conditions.
All intervals are percentile bootstraps over requests (each model resampled on its own).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_ROUNDS = 2000
CONFIDENCE = 0.95


def summary_ms(latencies_s: np.ndarray) -> dict[str, float]:
    if latencies_s.size == 0:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    ms = latencies_s * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
    }


@dataclass(frozen=True)
class Ratio:
    value: float
    low: float
    high: float

    def contains_one(self) -> bool:
        return self.low <= 1.0 <= self.high


def median_p90_ms(samples: list[float]) -> dict[str, float]:
    """Median and p90 of timings in seconds, in ms (2 decimals), and their count: the
    in-process measurements' summary (paths, int8_speed)."""
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1e3, 2),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 2), "n": len(ordered)}


def _statistic(samples: np.ndarray, name: str) -> np.ndarray:
    """`name` of each row of a [rounds, n] resample matrix."""
    if name == "p50":
        return np.percentile(samples, 50, axis=-1)
    if name == "p99":
        return np.percentile(samples, 99, axis=-1)
    if name == "mean":
        return samples.mean(axis=-1)
    raise ValueError(name)


def ratios(first: np.ndarray, other: np.ndarray, *, seed: int = 0, rounds: int = BOOTSTRAP_ROUNDS) -> dict[str, Ratio]:
    """other/first for p50 and p99, first/other for the service rate, with intervals."""
    if first.size < 2 or other.size < 2:
        nan = Ratio(float("nan"), float("nan"), float("nan"))
        return {"p50": nan, "p99": nan, "throughput": nan}
    rng = np.random.default_rng(seed)
    a = first[rng.integers(0, first.size, (rounds, first.size))]
    b = other[rng.integers(0, other.size, (rounds, other.size))]
    alpha = (1 - CONFIDENCE) / 2
    found = {}
    for name, stat, invert in (("p50", "p50", False), ("p99", "p99", False), ("throughput", "mean", True)):
        point = float(_statistic(other, stat) / _statistic(first, stat))
        boot = _statistic(b, stat) / _statistic(a, stat)
        if invert:
            point, boot = 1 / point, 1 / boot
        low, high = np.quantile(boot, [alpha, 1 - alpha])
        found[name] = Ratio(point, float(low), float(high))
    return found
