"""`cliplora bank top` against a stand-in for Prometheus' HTTP API (a thread in this
process answering /api/v1/query as Prometheus does): the query it asks, the order of its
answer, and its refusals. The load test's server-side figures go through the same query."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cliplora.cli import main
from cliplora.core import prometheus
from cliplora.core.errors import InvalidArgument, Unavailable
from cliplora.loadtest import prom
from tests import tools
from tests.ports import free_port


@dataclass
class StandIn:
    """What the stand-in answers (status, JSON body) and the queries it was asked."""

    url: str
    status: int = 200
    body: dict[str, Any] = field(default_factory=lambda: {"status": "success",
                                                          "data": {"resultType": "vector", "result": []}})
    asked: list[dict[str, list[str]]] = field(default_factory=list)

    def rates(self, rates: dict[str, str]) -> None:
        rows = [{"metric": {"adapter": a}, "value": [1700000000.0, v]} for a, v in rates.items()]
        self.body = {"status": "success", "data": {"resultType": "vector", "result": rows}}


@pytest.fixture()
def stand_in() -> Iterator[StandIn]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = StandIn(f"http://127.0.0.1:{server.server_address[1]}")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            parsed = urllib.parse.urlparse(self.path)
            assert parsed.path == "/api/v1/query", parsed.path
            state.asked.append(urllib.parse.parse_qs(parsed.query))
            payload = json.dumps(state.body).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_top_asks_for_the_banks_adapter_rates_and_lists_them_highest_first(
        stand_in: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    stand_in.rates({"cold": "0.5", "hot": "12.25", "warm": "3", "tied": "3", "gone": "NaN"})  # NaN: left out
    assert main(["bank", "top", "pets", "--prometheus", stand_in.url + "/", "--window", "10m", "--limit", "5"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"adapter": "hot", "requests_per_second": 12.25}, {"adapter": "tied", "requests_per_second": 3.0},
        {"adapter": "warm", "requests_per_second": 3.0}, {"adapter": "cold", "requests_per_second": 0.5}]
    (asked,) = stand_in.asked
    assert asked == {"query": ['topk(5, sum by (adapter) (rate(cliplora_gateway_adapter_requests_total'
                               '{model="pets",adapter!="base"}[10m])))']}


def test_top_defaults_and_an_empty_answer(stand_in: StandIn, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bank", "top", "pets", "--prometheus", stand_in.url]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert stand_in.asked[0]["query"] == [prometheus.top_adapters_query("pets", "5m", 10)]
    assert "topk(10," in stand_in.asked[0]["query"][0] and "[5m]" in stand_in.asked[0]["query"][0]


def test_an_unreachable_prometheus_is_unavailable_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as held:  # bound, never listening: connections to it are refused
        held.bind(("127.0.0.1", 0))
        _unreachable(f"http://127.0.0.1:{held.getsockname()[1]}", capsys)


def _unreachable(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Unavailable, match=f"Prometheus at {url} did not answer"):
        prometheus.top_adapters(url, "pets")
    assert main(["bank", "top", "pets", "--prometheus", url]) == 1
    assert capsys.readouterr().err.startswith(f"cliplora bank: UNAVAILABLE: Prometheus at {url} did not answer")


def test_answers_that_are_not_prometheus_answers(stand_in: StandIn) -> None:
    stand_in.status, stand_in.body = 400, {"status": "error", "errorType": "bad_data", "error": "parse error"}
    with pytest.raises(InvalidArgument, match=f"Prometheus at {stand_in.url} refused the query .*bad_data: parse "
                                              "error"):
        prometheus.top_adapters(stand_in.url, "pets")
    stand_in.status, stand_in.body = 503, {"status": "error", "errorType": "timeout", "error": "query timed out"}
    with pytest.raises(Unavailable, match="failed the query .*timeout: query timed out"):
        prometheus.top_adapters(stand_in.url, "pets")
    stand_in.status, stand_in.body = 200, {"status": "success", "data": {"result": [{"metric": {}, "value": [0, "1"]}]}}
    with pytest.raises(Unavailable, match="answered a row that is not an adapter's rate"):
        prometheus.top_adapters(stand_in.url, "pets")
    stand_in.body = {"hello": "world"}
    with pytest.raises(Unavailable, match="did not answer the query .* as Prometheus does"):
        prometheus.top_adapters(stand_in.url, "pets")


@pytest.mark.parametrize(("bank", "window", "limit", "message"), [
    ("pets", "5 minutes", 10, "--window must be a Prometheus duration"),
    ("pets", "5m]) or vector(1", 10, "--window must be a Prometheus duration"),
    ("pets", "5m", 0, "--limit must be 1..1000"),
    ('pets"} or up{x="', "5m", 10, "invalid model name"),
])
def test_bad_flags_are_refused_before_asking(stand_in: StandIn, bank: str, window: str, limit: int,
                                             message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        prometheus.top_adapters(stand_in.url, bank, window, limit)
    assert stand_in.asked == []


def test_the_load_test_queries_at_a_time_through_the_same_helper(stand_in: StandIn) -> None:
    stand_in.body = {"status": "success", "data": {"result": [{"metric": {"model": "m"}, "value": [5, "2"]}]}}
    assert prom.query(stand_in.url, "up", 1700000000.5) == [{"metric": {"model": "m"}, "value": [5, "2"]}]
    assert stand_in.asked == [{"query": ["up"], "time": ["1700000000.500"]}]


@pytest.fixture()
def growing_counters() -> Iterator[str]:
    """A /metrics page as a gateway's: adapter counters growing at 10/s (hot), 1/s (cold) and
    50/s (the base) in bank `pets`, 100/s in another bank; yields its host:port."""
    started = time.monotonic()
    rates = {("pets", "hot"): 10.0, ("pets", "cold"): 1.0, ("pets", "base"): 50.0, ("other", "x"): 100.0}

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            elapsed = time.monotonic() - started
            lines = [f"# TYPE {prometheus.ADAPTER_REQUESTS} counter"] + [
                f'{prometheus.ADAPTER_REQUESTS}{{model="{m}",adapter="{a}"}} {rate * elapsed:.3f}'
                for (m, a), rate in rates.items()]
            payload = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.subprocess
def test_top_against_the_real_prometheus(growing_counters: str) -> None:
    """The real Prometheus scraping counters that grow at known rates: the PromQL is one it
    accepts, and the answer ranks the bank's adapters by their rates, the base and other banks
    left out."""
    tools.require("prometheus")
    from cliplora.serve.stack.prometheus import LocalPrometheus, render_config

    server = LocalPrometheus(render_config(growing_counters, None, interval="1s"), port=free_port())
    try:
        server.start()
        deadline = time.monotonic() + 60
        while len(rates := prometheus.top_adapters(server.url, "pets", "4s")) < 2:
            assert time.monotonic() < deadline, f"no two rates from Prometheus within 60 s: {rates}"
            time.sleep(0.5)
        time.sleep(5)  # the 4 s window full of scrapes: rate() no longer extrapolates from a short series
        rates = prometheus.top_adapters(server.url, "pets", "4s")
    finally:
        server.cleanup()
    assert [r.adapter for r in rates] == ["hot", "cold"]
    assert rates[0].requests_per_second == pytest.approx(10.0, rel=0.2)
    assert rates[1].requests_per_second == pytest.approx(1.0, rel=0.2)
