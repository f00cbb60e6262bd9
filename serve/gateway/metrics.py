"""Prometheus metrics of the gateway, in base units, with a small fixed label set.

Model labels only take names of models the gateway knows (others count as
``"unknown"``), so a stream of bad requests cannot blow up the series count.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cliplora.core.prometheus import ADAPTER_REQUESTS

# 1 ms .. 30 s: a CPU ViT-L under load to a GPU ViT-B/32 at batch 1.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                   0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
PREPROCESS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
UNKNOWN = "unknown"


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self._requests(self.registry)
        self._pool(self.registry)
        self._text_cache(self.registry)
        self._models(self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _requests(self, r: CollectorRegistry) -> None:
        self.requests = Histogram(
            "cliplora_gateway_request_duration_seconds", "Gateway request latency, receipt to reply.",
            ["model", "version", "method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.triton = Histogram(
            "cliplora_gateway_triton_duration_seconds", "Round trip of one inference call to Triton.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess = Histogram(
            "cliplora_gateway_preprocess_duration_seconds", "Decode + resize + crop of one image.",
            buckets=PREPROCESS_BUCKETS, registry=r)
        self.in_flight = Gauge("cliplora_gateway_in_flight_requests", "Requests being handled now.", registry=r)
        self.images = Counter("cliplora_gateway_images_total", "Images classified.", ["model"], registry=r)
        self.rejected = Counter("cliplora_gateway_rejected_total", "Requests refused over the concurrency limit.",
                                registry=r)
        self.unauthenticated = Counter("cliplora_gateway_unauthenticated_total",
                                       "Calls refused for a missing or invalid bearer token.", registry=r)
        self.http_responses = Counter(
            "cliplora_gateway_http_responses_total",
            "Answers of the HTTP door by route (its pattern, never the raw path) and HTTP status.",
            ["route", "status"], registry=r)
        self.triton_ready = Gauge("cliplora_gateway_triton_ready", "1 while Triton answers ready.", registry=r)

    def _pool(self, r: CollectorRegistry) -> None:
        # The worker threads (serve/gateway/decode_pool.py): decoding and tokenizing wait here.
        self.pool_workers = Gauge("cliplora_gateway_preprocess_pool_workers", "Threads of the preprocessing pool.",
                                  registry=r)
        self.pool_queued = Gauge("cliplora_gateway_preprocess_pool_queued",
                                 "Tasks (images to decode, texts to tokenize) waiting for a pool thread.", registry=r)
        self.pool_busy = Gauge("cliplora_gateway_preprocess_pool_busy", "Pool threads working now.", registry=r)
        self.pool_wait = Histogram(
            "cliplora_gateway_preprocess_pool_wait_seconds", "Time a task waited for a pool thread.",
            buckets=PREPROCESS_BUCKETS, registry=r)
        self.pool_cpu = Counter("cliplora_gateway_preprocess_pool_cpu_seconds_total",
                                "CPU time the pool's tasks used (per-core throughput: tasks over this).", registry=r)

    def _text_cache(self, r: CollectorRegistry) -> None:
        self.text_cache_hits = Counter(
            "cliplora_gateway_text_cache_hits_total", "Prompt embeddings found in the cache (request-time labels).",
            ["model"], registry=r)
        self.text_cache_misses = Counter(
            "cliplora_gateway_text_cache_misses_total", "Prompt embeddings the text encoder had to compute.",
            ["model"], registry=r)
        self.text_cache_entries = Gauge("cliplora_gateway_text_cache_entries", "Prompt embeddings in the cache.",
                                        registry=r)

    def _models(self, r: CollectorRegistry) -> None:
        # Per bank adapter: one counter, its series bounded (serve/gateway/adapter_traffic.py).
        self.adapter_requests = Counter(
            ADAPTER_REQUESTS,  # what `cliplora bank top` asks Prometheus for
            "Requests per bank adapter, for the adapters the gateway tracks (at most --adapter-series per bank).",
            ["model", "adapter"], registry=r)
        self.adapter_evictions = Counter(
            "cliplora_gateway_adapter_series_evictions_total",
            "Adapters whose request series gave way to another (the --adapter-series bound at work).",
            ["model"], registry=r)
        self.model_info = Gauge(
            "cliplora_gateway_model_info",
            "1 per served model; base_model/base_weights/lora from its manifest pair a LoRA model with its base.",
            ["model", "base_model", "base_weights", "lora"], registry=r)
        # Of the local stack (`cliplora serve` without --triton-url): its supervisor counts here.
        self.stack_restarts = Counter("cliplora_stack_restarts_total",
                                      "Restarts of a local stack child (triton, prometheus) after it exited or hung.",
                                      ["component"], registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port (useful with port 0)."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
