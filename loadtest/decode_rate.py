"""Gateway preprocessing throughput, from the gateways' own metrics, side by side.

    python -m cliplora.loadtest.decode_rate --gateway exact=http://127.0.0.1:9402/metrics \\
        --gateway fast=http://127.0.0.1:9400/metrics --seconds 60 > decode-rate.json

Reads every gateway's ``/metrics`` at the start and at the end of the same window (run
it while a load, e.g. ``cliplora loadtest --images photos``, keeps each gateway busy), and
reports for each, over the window: the images preprocessed (the preprocessing
histogram's count), their mean wall time in a worker (its sum over its count), images
per second per busy worker (the inverse: per core while each worker has a core to
itself), images per CPU second (over the pool's CPU-time counter: per core whatever else
shares the machine) and the pool's mean queue wait; then the ratios of every gateway to
the first. Measured at the same time, the gateways share the machine's drift alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SAMPLES = {
    "count": "cliplora_gateway_preprocess_duration_seconds_count",
    "seconds": "cliplora_gateway_preprocess_duration_seconds_sum",
    "cpu_seconds": "cliplora_gateway_preprocess_pool_cpu_seconds_total",
    "tasks": "cliplora_gateway_preprocess_pool_wait_seconds_count",
    "wait_seconds": "cliplora_gateway_preprocess_pool_wait_seconds_sum",
    "workers": "cliplora_gateway_preprocess_pool_workers",
}


def scrape(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """The samples of `SAMPLES` from one ``/metrics`` page (unlabelled series)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - a URL the operator gives
        text = response.read().decode()
    found = {sample.name: sample.value for family in text_string_to_metric_families(text)
             for sample in family.samples if not sample.labels}
    missing = [name for name in SAMPLES.values() if name not in found]
    if missing:
        raise SystemExit(f"{url} has no {', '.join(missing)}: not a cliplora gateway with the decode pool")
    return {key: found[name] for key, name in SAMPLES.items()}


def rates(before: dict[str, float], after: dict[str, float], window_s: float) -> dict[str, Any]:
    delta = {key: after[key] - before[key] for key in SAMPLES}
    images = delta["count"]
    if images <= 0:
        return {"images": 0, "note": "no image was preprocessed in the window"}
    return {
        "images": int(images),
        "workers": int(after["workers"]),
        "window_s": round(window_s, 1),
        "images_per_s": round(images / window_s, 2),
        "mean_ms": round(delta["seconds"] / images * 1e3, 2),
        "images_per_busy_worker_s": round(images / delta["seconds"], 2),
        "images_per_cpu_s": round(images / delta["cpu_seconds"], 2) if delta["cpu_seconds"] > 0 else None,
        "mean_queue_wait_ms": round(delta["wait_seconds"] / delta["tasks"] * 1e3, 2) if delta["tasks"] else None,
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    names = list(results)
    first = results[names[0]]
    out = {}
    for name in names[1:]:
        out[f"{name}/{names[0]}"] = {
            key: round(results[name][key] / first[key], 2)
            for key in ("images_per_busy_worker_s", "images_per_cpu_s", "images_per_s")
            if results[name].get(key) and first.get(key)
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", action="append", required=True, metavar="NAME=URL",
                        help="a gateway's /metrics URL; repeat (ratios are against the first)")
    parser.add_argument("--seconds", type=float, default=60.0, help="the window (default 60)")
    args = parser.parse_args(argv)
    gateways = dict(entry.split("=", 1) for entry in args.gateway if "=" in entry)
    if len(gateways) != len(args.gateway):
        raise SystemExit("--gateway takes NAME=URL, e.g. fast=http://127.0.0.1:9400/metrics")
    before = {name: scrape(url) for name, url in gateways.items()}
    started = time.monotonic()
    time.sleep(args.seconds)
    after = {name: scrape(url) for name, url in gateways.items()}
    window = time.monotonic() - started
    results = {name: rates(before[name], after[name], window) for name in gateways}
    json.dump({"gateways": results, "ratios": ratios(results)}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
