"""Requests per bank adapter in a bounded number of series: the heavy hitters keep theirs."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from cliplora.serve.gateway.adapter_traffic import AdapterTraffic
from cliplora.v1 import classifier_pb2 as pb
from tests.fakes import FakeContext, image_bytes, service


def _traffic(max_series: int) -> tuple[AdapterTraffic, CollectorRegistry]:
    registry = CollectorRegistry()
    requests = Counter("adapter_requests", "", ["model", "adapter"], registry=registry)
    evictions = Counter("evictions", "", ["model"], registry=registry)
    return AdapterTraffic(requests, evictions, max_series), registry


def _series(registry: CollectorRegistry) -> dict[str, float]:
    return {s.labels["adapter"]: s.value for metric in registry.collect() for s in metric.samples
            if s.name == "adapter_requests_total"}


def test_a_thousand_adapters_make_at_most_the_bound_in_series_and_the_hot_ones_keep_theirs() -> None:
    """Zipf(1.1) traffic over 1,000 adapters with room for 16 series: never more than 16;
    the adapters with more than 1/16 of the traffic (the two hottest) hold series at the
    end, each short of its true count by at most 1/16 of all requests, and rank first."""
    traffic, registry = _traffic(16)
    rng = np.random.default_rng(0)
    weights = 1 / np.arange(1, 1001) ** 1.1
    draws = rng.choice(1000, size=20_000, p=weights / weights.sum())
    for draw in draws:
        traffic.count("bank", f"a{draw}")
        assert len(_series(registry)) <= 16
    series = _series(registry)
    true = np.bincount(draws, minlength=1000)
    heavy = [k for k in range(1000) if true[k] > len(draws) / 16]
    assert heavy == [0, 1], heavy
    for k in heavy:
        assert 0 <= true[k] - series[f"a{k}"] <= len(draws) / 16, (k, true[k], series[f"a{k}"])
    assert sorted(series, key=series.__getitem__, reverse=True)[:2] == ["a0", "a1"]
    assert registry.get_sample_value("evictions_total", {"model": "bank"}) > 0


def test_banks_have_their_own_bounds() -> None:
    traffic, registry = _traffic(2)
    for model in ("one", "two"):
        for adapter in ("a", "b", "a"):
            traffic.count(model, adapter)
    assert traffic.tracked("one") == {"a": 2, "b": 1} == traffic.tracked("two")
    assert registry.get_sample_value("evictions_total", {"model": "one"}) is None


async def test_the_gateway_counts_each_request_for_its_adapter() -> None:
    svc = service(adapter_series=8)
    for adapter in ("acme", "zeta", "acme"):
        await svc.Classify(pb.ClassifyRequest(model="bank", adapter=adapter, images=[pb.Image(encoded=image_bytes())]),
                           FakeContext())
    registry = svc.metrics.registry
    assert registry.get_sample_value("cliplora_gateway_adapter_requests_total", {"model": "bank", "adapter": "acme"}) == 2
    assert registry.get_sample_value("cliplora_gateway_adapter_requests_total", {"model": "bank", "adapter": "zeta"}) == 1
