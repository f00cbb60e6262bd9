"""Server-side numbers from Prometheus (HTTP API) for a finished run, and the verdict.

- gateway: per-model p50/p99 from the latency histogram (bucket-interpolated, so only
  as fine as the buckets) and the exact mean (``_sum / _count``);
- Triton: compute time per inference, ``nv_inference_compute_infer_duration_us /
  nv_inference_count``, per model.
All as increases over the run's window, evaluated at its end.
"""

from __future__ import annotations

import math
import time
from typing import Any

from cliplora.core import prometheus

GATEWAY = "cliplora_gateway_request_duration_seconds"


def query(url: str, promql: str, at: float) -> list[dict[str, Any]]:
    """An instant query at `at` (`cliplora.core.prometheus.query`)."""
    return prometheus.query(url, promql, at)


def _by_model(rows: list[dict[str, Any]], scale: float = 1.0) -> dict[str, float]:
    found = {}
    for row in rows:
        value = float(row["value"][1])
        if math.isfinite(value):
            found[row["metric"].get("model", "")] = value * scale
    return found


def server_side(url: str, models: list[str], start_unix: float, end_unix: float,
                scrape_wait_s: float = 0.0) -> dict[str, Any]:
    """Per-model server-side figures over [start, end]; waits `scrape_wait_s` for the last scrape."""
    if scrape_wait_s:
        time.sleep(scrape_wait_s)
    window = max(int(math.ceil(end_unix - start_unix)), 1)
    at = end_unix + scrape_wait_s
    window += int(math.ceil(scrape_wait_s))
    selector = 'method="Classify",code="OK"'
    rate = f"[{window}s]"
    gateway_q = {
        "p50_ms": f"histogram_quantile(0.5, sum by (le, model) (increase({GATEWAY}_bucket{{{selector}}}{rate})))",
        "p99_ms": f"histogram_quantile(0.99, sum by (le, model) (increase({GATEWAY}_bucket{{{selector}}}{rate})))",
        "mean_ms": f"sum by (model) (increase({GATEWAY}_sum{{{selector}}}{rate})) / "
                   f"sum by (model) (increase({GATEWAY}_count{{{selector}}}{rate}))",
        "requests": f"sum by (model) (increase({GATEWAY}_count{{{selector}}}{rate}))",
    }
    triton_q = {
        "compute_ms_per_inference": f"sum by (model) (increase(nv_inference_compute_infer_duration_us{rate})) / "
                                    f"sum by (model) (increase(nv_inference_count{rate})) / 1000",
        "inferences": f"sum by (model) (increase(nv_inference_count{rate}))",
        "queue_ms_per_request": f"sum by (model) (increase(nv_inference_queue_duration_us{rate})) / "
                                f"sum by (model) (increase(nv_inference_request_success{rate})) / 1000",
    }
    report: dict[str, Any] = {"window_seconds": window, "evaluated_at": at, "gateway": {}, "triton": {}}
    for section, queries in (("gateway", gateway_q), ("triton", triton_q)):
        for key, promql in queries.items():
            scale = 1e3 if key.endswith("_ms") and section == "gateway" else 1.0
            for model, value in _by_model(query(url, promql, at), scale).items():
                if model in models:
                    report[section].setdefault(model, {})[key] = value
    return report


Figure = tuple[str, str]  # (section of `server_side`'s report, key): ("triton", "compute_ms_per_inference")
TRITON_COMPUTE: Figure = ("triton", "compute_ms_per_inference")
GATEWAY_MEAN: Figure = ("gateway", "mean_ms")
THROUGH_GATEWAY: tuple[Figure, ...] = (TRITON_COMPUTE, GATEWAY_MEAN)  # the load went gateway -> Triton
DIRECT_TRITON: tuple[Figure, ...] = (TRITON_COMPUTE,)  # `--direct-triton`: no gateway figures exist


def _figure(server: dict[str, Any], section: str, model: str, key: str) -> float | None:
    """A usable figure: a finite, positive number; None when absent or not one."""
    value = server.get(section, {}).get(model, {}).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def verdict(server: dict[str, Any], base: str, others: list[str], bound: float,
            required: tuple[Figure, ...] = THROUGH_GATEWAY) -> dict[str, Any]:
    """Each other model vs `base` on every `required` figure (slower by at most `bound`).

    A comparison is `computed` only when every required figure of both models is there
    (finite and positive); one with a figure `missing` is not within the bound, so the
    verdict cannot pass on half its evidence.
    """
    if not required:
        raise ValueError("a verdict needs at least one required figure")
    results = {}
    for model in others:
        entry: dict[str, Any] = {}
        missing = []
        for section, key in required:
            a, b = _figure(server, section, base, key), _figure(server, section, model, key)
            missing += [f"{section}.{key}[{m}]" for m, v in ((base, a), (model, b)) if v is None]
            if a is not None and b is not None:
                entry[f"{section}_{key}_ratio"] = b / a
        entry["missing"] = missing
        entry["computed"] = not missing
        entry["within_bound"] = not missing and all(
            v <= 1 + bound for k, v in entry.items() if k.endswith("_ratio"))
        results[f"{model}/{base}"] = entry
    return {"bound": bound, "required": [f"{section}.{key}" for section, key in required], "comparisons": results,
            "passed": bool(results) and all(e["within_bound"] for e in results.values())}
