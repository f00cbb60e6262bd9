"""Requests per bank adapter, with a bound on how many time series that makes.

A bank may hold thousands of adapters, and one series per adapter per histogram would
multiply the gateway's series by as much. So latency histograms stay per model, and the
per-adapter figure is one counter, ``cliplora_gateway_adapter_requests_total{model,
adapter}``, kept for at most `max_series` adapters per bank: the heavy hitters, by the
Space-Saving algorithm (Metwally et al., 2005). An adapter not yet tracked takes the place
of the tracked one with the smallest count (its series is removed; the eviction is counted
in ``cliplora_gateway_adapter_series_evictions_total{model}``) and inherits that count as
its estimate. The algorithm's guarantee: at any moment every adapter with more than
1 / `max_series` of the bank's requests so far holds a series, and its series has missed
at most that many of its requests (those before it was last admitted). Prometheus'
``rate()`` treats a series that starts late as a counter reset, so ``topk(N, rate(...))``
over a window ranks the hot adapters: `cliplora bank top` does.
"""

from __future__ import annotations

from prometheus_client import Counter


class AdapterTraffic:
    def __init__(self, requests: Counter, evictions: Counter, max_series: int) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be positive, got {max_series}")
        self.requests = requests
        self.evictions = evictions
        self.max_series = max_series
        self._estimates: dict[str, dict[str, int]] = {}  # model -> tracked adapter -> estimated count

    def count(self, model: str, adapter: str) -> None:
        """One request for `adapter` of bank `model`."""
        tracked = self._estimates.setdefault(model, {})
        if adapter not in tracked:
            estimate = 0
            if len(tracked) >= self.max_series:
                victim = min(tracked, key=tracked.__getitem__)
                estimate = tracked.pop(victim)
                self.requests.remove(model, victim)
                self.evictions.labels(model).inc()
            tracked[adapter] = estimate
        tracked[adapter] += 1
        self.requests.labels(model, adapter).inc()

    def tracked(self, model: str) -> dict[str, int]:
        """The adapters of `model` with a series, and their estimated counts."""
        return dict(self._estimates.get(model, {}))
