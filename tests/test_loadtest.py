"""The load tester: interleaving, bounds, statistics, the report contract, and Prometheus."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cliplora.loadtest.cli import generated_images
from cliplora.loadtest.prom import DIRECT_TRITON, verdict
from cliplora.loadtest.report import build_report, render_markdown, write_report
from cliplora.loadtest.runner import Record, RunResult, run_load
from cliplora.loadtest.stats import ratios, summary_ms
from cliplora.loadtest.targets import RequestFailed
from tests import tools


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
    """One worker alternates A, B, A, B from the first request; warm-up requests are sent but
    not measured; only what fits in the window is. Every bound below follows from the fake's
    delays (asyncio.sleep never returns early), not from how fast this machine is."""
    base_s, warmup_s, duration_s = 0.05, 0.2, 0.5
    target = FakeTarget(base_s=base_s)
    result = await run_load(target, ["fast", "slow"], concurrency=1, duration_s=duration_s, warmup_s=warmup_s,
                            progress=False)
    assert target.sent == ["fast", "slow"] * (len(target.sent) // 2) + ["fast"] * (len(target.sent) % 2)
    warmup_sent = len(target.sent) - len(result.records)
    assert 1 <= warmup_sent <= warmup_s / base_s + 1e-9  # sent from t=0, each one >= base_s after the last
    assert 4 <= len(result.records) <= duration_s / base_s + 1e-9
    assert [r.model for r in result.records] == target.sent[warmup_sent:]  # the measured ones are the last sent
    starts = [r.start for r in result.records]
    assert 0 <= starts[0] and starts[-1] < duration_s
    assert all(later - earlier >= base_s - 1e-3 for earlier, later in itertools.pairwise(starts))
    assert all(r.latency >= base_s - 1e-3 and r.code == "OK" for r in result.records)
    assert result.measured_seconds == pytest.approx(duration_s)


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
    """The contract's keys, percentiles at least the fake's delays (slow = 2 x base), ratios
    of the per-model figures, failures counted, and the three files (strict JSON)."""
    base_s, factor = 0.05, 2.0
    result = await run_load(FakeTarget(base_s=base_s, factor=factor), ["fast", "slow", "bad"], concurrency=2,
                            duration_s=0.6, warmup_s=0.1, progress=False)
    report = build_report(result, target="fake")
    assert set(report["models"]) == {"fast", "slow", "bad"}
    for entry in report["models"].values():
        assert set(entry) == {"requests", "errors", "throughput_rps", "latency_ms"}
        assert set(entry["latency_ms"]) == {"p50", "p90", "p99", "mean"}
    assert set(report["ratios"]) == {"slow/fast", "bad/fast"}
    assert set(report["ratios"]["slow/fast"]) == {"p50", "p99", "throughput"}
    fast, slow = (report["models"][m]["latency_ms"] for m in ("fast", "slow"))
    for entry, delay_ms in ((fast, base_s * 1e3), (slow, factor * base_s * 1e3)):
        assert delay_ms - 1 <= entry["p50"] <= entry["p90"] <= entry["p99"] and entry["mean"] >= delay_ms - 1
    # The one bound not certain by construction: fast's median overshoots its sleep by less than
    # base_s (a runner that timed from the run's start, or mixed up models, is far beyond it).
    assert fast["p50"] < factor * base_s * 1e3
    assert report["ratios"]["slow/fast"]["p50"] == pytest.approx(slow["p50"] / fast["p50"])
    assert report["ratios"]["slow/fast"]["p99"] == pytest.approx(slow["p99"] / fast["p99"])
    assert report["models"]["bad"]["errors"] == report["models"]["bad"]["requests"] > 0
    write_report(report, result, tmp_path / "out")
    loaded = json.loads((tmp_path / "out" / "report.json").read_text())  # strict JSON: no NaN
    assert loaded["models"]["bad"]["latency_ms"]["p50"] is None
    assert "| slow/fast |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _server(compute: dict[str, float | None], mean: dict[str, float | None]) -> dict[str, Any]:
    """`prom.server_side`'s shape: a model whose figure is None lacks it."""
    return {"triton": {m: {"compute_ms_per_inference": v} for m, v in compute.items() if v is not None},
            "gateway": {m: {"mean_ms": v} for m, v in mean.items() if v is not None}}


@pytest.mark.parametrize(("slowdown", "passed"), [(1.01, True), (1.05, False)])
def test_verdict_holds_every_figure_to_the_bound(slowdown: float, passed: bool) -> None:
    """Bound 0.02: a 1% slowdown passes, 5% fails, whichever of the two figures it is in."""
    for compute, mean in ((slowdown, 1.0), (1.0, slowdown)):
        server = _server({"base": 10.0, "lora": 10.0 * compute}, {"base": 20.0, "lora": 20.0 * mean})
        result = verdict(server, "base", ["lora"], 0.02)
        entry = result["comparisons"]["lora/base"]
        assert entry["triton_compute_ms_per_inference_ratio"] == pytest.approx(compute)
        assert entry["gateway_mean_ms_ratio"] == pytest.approx(mean)
        assert entry["computed"] and entry["missing"] == []
        assert entry["within_bound"] is passed and result["passed"] is passed
        assert result["bound"] == 0.02
        assert result["required"] == ["triton.compute_ms_per_inference", "gateway.mean_ms"]


def test_verdict_with_a_figure_missing_is_not_a_pass() -> None:
    """A comparison lacking any figure it needs is neither computed nor within the bound,
    however good the other figure looks; the missing figures are named."""
    cases = [
        (_server({"base": 10.0, "lora": None}, {"base": 20.0, "lora": 20.0}),
         ["triton.compute_ms_per_inference[lora]"]),
        (_server({"base": 10.0, "lora": 10.0}, {"base": None, "lora": 20.0}), ["gateway.mean_ms[base]"]),
        (_server({"base": 10.0, "lora": float("nan")}, {"base": 20.0, "lora": 0.0}),
         ["triton.compute_ms_per_inference[lora]", "gateway.mean_ms[lora]"]),
        ({}, ["triton.compute_ms_per_inference[base]", "triton.compute_ms_per_inference[lora]",
              "gateway.mean_ms[base]", "gateway.mean_ms[lora]"]),
    ]
    for server, missing in cases:
        result = verdict(server, "base", ["lora"], 0.02)
        entry = result["comparisons"]["lora/base"]
        assert entry["missing"] == missing, server
        assert entry["computed"] is False and entry["within_bound"] is False and result["passed"] is False
    # the ratio that could be computed is still reported
    entry = verdict(cases[0][0], "base", ["lora"], 0.02)["comparisons"]["lora/base"]
    assert entry["gateway_mean_ms_ratio"] == pytest.approx(1.0)
    assert "triton_compute_ms_per_inference_ratio" not in entry


def test_verdict_required_figures_and_every_comparison() -> None:
    """Straight to Triton only Triton's figure is required; one model outside fails it all."""
    triton_only = _server({"base": 10.0, "lora": 10.1, "other": 10.0}, {})
    assert verdict(triton_only, "base", ["lora", "other"], 0.02, DIRECT_TRITON)["passed"] is True
    assert verdict(triton_only, "base", ["lora", "other"], 0.02)["passed"] is False  # the gateway's are missing
    result = verdict(_server({"base": 10.0, "lora": 10.1, "other": 11.0}, {}), "base", ["lora", "other"], 0.02,
                     DIRECT_TRITON)
    assert result["required"] == ["triton.compute_ms_per_inference"]
    assert [e["within_bound"] for e in result["comparisons"].values()] == [True, False]
    assert result["passed"] is False
    assert verdict(triton_only, "base", [], 0.02, DIRECT_TRITON)["passed"] is False  # nothing compared
    with pytest.raises(ValueError):
        verdict(triton_only, "base", ["lora"], 0.02, ())


def test_verdict_in_report_markdown() -> None:
    """report.md says PASS/FAIL, shows each ratio and names what is missing."""
    records = [Record(m, i * 0.01, 0.01 + 0.001 * i, "OK") for i in range(4) for m in ("base", "lora")]
    report = build_report(RunResult(models=["base", "lora"], records=records, measured_seconds=1.0), target="fake")
    report["verdict"] = verdict(_server({"base": 10.0, "lora": 10.1}, {"base": 20.0}), "base", ["lora"], 0.02)
    text = render_markdown(report)
    assert "**Verdict: FAIL**" in text
    assert "- lora/base: triton_compute_ms_per_inference ×1.010; missing gateway.mean_ms[lora] → NOT COMPUTED" in text
    report["verdict"] = verdict(_server({"base": 10.0, "lora": 10.1}, {}), "base", ["lora"], 0.02, DIRECT_TRITON)
    text = render_markdown(report)
    assert "**Verdict: PASS**" in text and "- lora/base: triton_compute_ms_per_inference ×1.010 → within" in text


def test_prometheus_without_a_server_is_refused(tmp_path, capsys) -> None:
    """An --in-process load has no server-side figures, so no verdict could ever be computed."""
    from cliplora.cli import main

    code = main(["loadtest", "--in-process", str(tmp_path), "--models", "base,lora", "--report", str(tmp_path / "r"),
                 "--prometheus", "http://127.0.0.1:1", "--quiet"])
    assert code == 1 and "INVALID_ARGUMENT: --prometheus needs a server" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_generated_images_are_jpegs() -> None:
    images = generated_images(4)
    assert len(images) == 4 and all(i[:2] == b"\xff\xd8" for i in images)


async def test_verdict_from_scraped_data(tmp_path, tiny_repository, tiny_triton) -> None:
    """Triton + gateway + a real Prometheus: the report's server side comes from scrapes."""
    tools.require("prometheus")
    from cliplora.serve.gateway.server import GatewayServer
    from cliplora.serve.gateway.settings import GatewaySettings
    from cliplora.serve.stack.prometheus import LocalPrometheus, render_config
    from tests.serving import (
        free_port,
        metrics_text,
        wait_for_health,
    )

    repository = tiny_repository
    triton = tiny_triton
    gateway = prometheus = None
    try:
        gateway = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=0, triton_url=triton.grpc_url,
                                                repository=repository, health_interval_s=0.2))
        await gateway.start()
        prometheus = LocalPrometheus(render_config(f"127.0.0.1:{gateway.metrics_port}",
                                                   f"127.0.0.1:{triton.ports.metrics}", interval="1s"),
                                     port=free_port())
        prometheus.start()
        await wait_for_health(gateway.port, "SERVING", timeout_s=60)

        # The load comes from another process, as it would: this one serves the gateway.
        bound = 0.5
        command = [str(Path(sys.executable).with_name("cliplora")), "loadtest", "--target", f"127.0.0.1:{gateway.port}",
                   "--models", "base,lora", "--concurrency", "1", "--duration", "8", "--warmup", "2",
                   "--report", str(tmp_path / "report"), "--prometheus", prometheus.url, "--scrape-wait", "3",
                   "--overhead-bound", str(bound), "--quiet"]
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
        # The verdict, recomputed here from the reported per-model figures and the bound.
        expected = {f"{section}_{key}_ratio": server[section]["lora"][key] / server[section]["base"][key]
                    for section, key in (("triton", "compute_ms_per_inference"), ("gateway", "mean_ms"))}
        expected_pass = all(ratio <= 1 + bound for ratio in expected.values())
        comparison = report["verdict"]["comparisons"]["lora/base"]
        assert {k: v for k, v in comparison.items() if k.endswith("_ratio")} == pytest.approx(expected)
        assert comparison["computed"] is True and comparison["missing"] == []
        assert comparison["within_bound"] is expected_pass and report["verdict"]["passed"] is expected_pass
        assert report["verdict"]["bound"] == bound
        assert f"**Verdict: {'PASS' if expected_pass else 'FAIL'}**" in stdout.decode()

        text = metrics_text(gateway.metrics_port)
        assert 'cliplora_gateway_model_info{base_model="tiny-clip",base_weights="random",lora="none",model="base"} 1.0' in text
        assert 'lora="clip-lora",model="lora"' in text
    finally:
        if prometheus is not None:
            prometheus.cleanup()
        if gateway is not None:
            await gateway.stop(1)


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
