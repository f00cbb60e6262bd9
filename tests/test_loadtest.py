"""The load tester: interleaving, bounds, statistics, the report contract, and Prometheus."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cliplora.loadtest.cli import generated_images
from cliplora.loadtest.report import build_report, write_report
from cliplora.loadtest.runner import run_load
from cliplora.loadtest.stats import ratios, summary_ms
from cliplora.loadtest.targets import RequestFailed


class FakeTarget:
    """Model 'slow' takes `factor` times as long as 'fast'; 'bad' always fails."""

    description = "fake"

    def __init__(self, base_s: float = 0.01, factor: float = 1.0) -> None:
        self.base_s, self.factor = base_s, factor
        self.sent: list[str] = []

    async def start(self, models):
        pass

    async def send(self, model: str, item: int) -> None:
        self.sent.append(model)
        if model == "bad":
            raise RequestFailed("UNAVAILABLE", "down")
        await asyncio.sleep(self.base_s * (self.factor if model == "slow" else 1.0))

    async def close(self):
        pass


def test_summary_and_ratios() -> None:
    rng = np.random.default_rng(0)
    a = rng.gamma(20, 0.005, 3000)
    same = ratios(a, rng.gamma(20, 0.005, 3000))
    assert all(r.contains_one() for r in same.values())
    slower = ratios(a, a * 1.5)
    assert slower["p50"].value == pytest.approx(1.5) and not slower["p50"].contains_one()
    assert slower["throughput"].value == pytest.approx(1 / 1.5) and slower["throughput"].high < 1
    ms = summary_ms(np.array([0.001, 0.002, 0.003, 0.004]))
    assert ms["p50"] == pytest.approx(2.5) and ms["mean"] == pytest.approx(2.5)


async def test_closed_loop_interleaves_and_excludes_warmup() -> None:
    target = FakeTarget(base_s=0.01)
    result = await run_load(target, ["fast", "slow"], concurrency=1, duration_s=0.6, warmup_s=0.2, progress=False)
    assert target.sent[:6] == ["fast", "slow"] * 3  # A, B, A, B ...
    assert len(target.sent) > len(result.records)  # warm-up requests are not measured
    counts = [sum(r.model == m for r in result.records) for m in ("fast", "slow")]
    assert abs(counts[0] - counts[1]) <= 1
    assert all(r.start >= 0 for r in result.records)
    assert 0.55 <= result.measured_seconds <= 0.8


async def test_request_bound_and_errors_counted() -> None:
    result = await run_load(FakeTarget(), ["fast", "bad"], concurrency=3, duration_s=30, warmup_s=0,
                            max_requests=20, progress=False)
    assert len(result.records) == 20
    failures = result.errors("bad").get("UNAVAILABLE", 0)
    assert result.errors("fast") == {} and set(result.errors("bad")) == {"UNAVAILABLE"}
    assert failures + result.latencies("fast").size == 20 and min(failures, 20 - failures) >= 7


async def test_open_loop_counts_queueing_from_the_schedule() -> None:
    """10 req/s into a server that takes 0.3 s per request, one at a time: latency grows."""
    lock = asyncio.Lock()

    class Serial(FakeTarget):
        async def send(self, model, item):
            async with lock:
                await asyncio.sleep(0.3)

    result = await run_load(Serial(), ["fast"], rate=10, duration_s=1.0, warmup_s=0, progress=False)
    latencies = sorted(r.latency for r in result.records)
    assert len(latencies) == 10
    assert latencies[-1] > 2.0  # the 10th waited for 9 others: queueing is not hidden
    assert result.mode == "open" and result.rate == 10


async def test_report_contract_and_files(tmp_path) -> None:
    result = await run_load(FakeTarget(base_s=0.005, factor=2.0), ["fast", "slow", "bad"], concurrency=2,
                            duration_s=0.5, warmup_s=0.1, progress=False)
    report = build_report(result, target="fake")
    assert set(report["models"]) == {"fast", "slow", "bad"}
    for entry in report["models"].values():
        assert set(entry) == {"requests", "errors", "throughput_rps", "latency_ms"}
        assert set(entry["latency_ms"]) == {"p50", "p90", "p99", "mean"}
    assert set(report["ratios"]) == {"slow/fast", "bad/fast"}
    assert set(report["ratios"]["slow/fast"]) == {"p50", "p99", "throughput"}
    assert 1.5 < report["ratios"]["slow/fast"]["p50"] < 2.6
    assert report["models"]["bad"]["errors"] == report["models"]["bad"]["requests"] > 0
    write_report(report, result, tmp_path / "out")
    loaded = json.loads((tmp_path / "out" / "report.json").read_text())  # strict JSON: no NaN
    assert loaded["models"]["bad"]["latency_ms"]["p50"] is None
    assert "| slow/fast |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generated_images_are_jpegs() -> None:
    images = generated_images(4)
    assert len(images) == 4 and all(i[:2] == b"\xff\xd8" for i in images)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (make test installs it)")
async def test_verdict_from_scraped_data(tmp_path, tiny_repository) -> None:
    """Triton + gateway + a real Prometheus: the report's server side comes from scrapes."""
    from cliplora.serve.prometheus import LocalPrometheus, render_config
    from cliplora.serve.server import GatewayServer
    from cliplora.serve.settings import GatewaySettings
    from cliplora.serve.triton_launcher import LocalTriton
    from tests.serving import (
        free_port,
        metrics_text,
        triton_ports,
        wait_for_health,
    )

    repository = tiny_repository
    triton = LocalTriton(repository, ports=triton_ports())
    gateway = prometheus = None
    try:
        await asyncio.get_running_loop().run_in_executor(None, triton.start)
        gateway = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=0, triton_url=triton.grpc_url,
                                                repository=repository, health_interval_s=0.2))
        await gateway.start()
        prometheus = LocalPrometheus(render_config(f"127.0.0.1:{gateway.metrics_port}",
                                                   f"127.0.0.1:{triton.ports.metrics}", interval="1s"),
                                     port=free_port())
        prometheus.start()
        await wait_for_health(gateway.port, "SERVING", timeout_s=60)

        # The load comes from another process, as it would: this one serves the gateway.
        command = [str(Path(sys.executable).with_name("cliplora")), "loadtest", "--target", f"127.0.0.1:{gateway.port}",
                   "--models", "base,lora", "--concurrency", "1", "--duration", "8", "--warmup", "2",
                   "--report", str(tmp_path / "report"), "--prometheus", prometheus.url, "--scrape-wait", "3",
                   "--overhead-bound", "0.5", "--quiet"]
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, stderr.decode()
        assert "Verdict:" in stdout.decode()
        report = json.loads((tmp_path / "report" / "report.json").read_text())
        measured = {m: report["models"][m]["requests"] for m in ("base", "lora")}
        assert all(n > 10 for n in measured.values()) and report["models"]["lora"]["errors"] == 0
        server = report["prometheus"]
        for model in ("base", "lora"):
            gateway_side = server["gateway"][model]
            assert gateway_side["mean_ms"] > 0 and gateway_side["p50_ms"] > 0
            # The scraped count covers the measured run: Prometheus' increase() over the window
            # is extrapolated from 1 s scrapes of a busy process, hence the loose bounds.
            assert measured[model] * 0.5 <= gateway_side["requests"] <= measured[model] * 1.5, server
            assert server["triton"][model]["compute_ms_per_inference"] > 0
            assert server["triton"][model]["inferences"] >= measured[model] * 0.5
        verdict = report["verdict"]["comparisons"]["lora/base"]
        assert verdict["computed"] and "triton_compute_ms_per_inference_ratio" in verdict
        assert report["verdict"]["passed"] == verdict["within_bound"]

        text = metrics_text(gateway.metrics_port)
        assert 'cliplora_gateway_model_info{base_model="tiny-clip",base_weights="random",lora="none",model="base"} 1.0' in text
        assert 'lora="clip-lora",model="lora"' in text
    finally:
        if prometheus is not None:
            prometheus.cleanup()
        if gateway is not None:
            await gateway.stop(1)
        triton.cleanup()


def test_soak_report_helpers() -> None:
    import os

    from cliplora.loadtest.soak import render, rss_mib

    assert 10 < rss_mib(os.getpid()) < 100_000
    report = {"model": "m", "capacity_rps": 5.0, "rate_rps": 4.0, "minutes": 10, "requests": 2400,
              "errors": {"UNAVAILABLE": 2}, "latency_ms": {"p50": 300.0, "p90": 400.0, "p99": 500.0, "mean": 310.0},
              "gateway_rss_mib": {"start": 200.0, "max": 230.0, "end": 225.0, "growth_after_first_minute": 3.5}}
    text = render(report)
    assert "errors 2" in text and "+3.5 MiB" in text and "held 4.00 req/s" in text


def test_rotating_batches_wrap_around() -> None:
    from cliplora.loadtest.targets import rotating_batches

    assert rotating_batches(["a", "b", "c"], 2) == [["a", "b"], ["b", "c"], ["c", "a"]]
    assert rotating_batches(["a"], 3) == [["a", "a", "a"]]
