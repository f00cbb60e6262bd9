"""`cliplora loadtest` against each of its other targets, through the CLI, on the tiny models:
Triton directly (`--direct-triton`), ONNX Runtime in process (`--in-process`) and the
gateway with raw RGB crops (`--raw`). One real Triton serves the whole module."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cliplora.serve.stack.triton_launcher import LocalTriton
from tests import tools
from tests.serving import free_port, in_process_gateway

MODELS = ("base", "lora")
CLI = str(Path(sys.executable).with_name("cliplora"))
SHORT = ["--models", ",".join(MODELS), "--warmup", "0.5", "--quiet"]


@pytest.fixture(scope="module")
def triton(tiny_triton: LocalTriton) -> LocalTriton:
    """The session's tritonserver on the tiny `base` and `lora`."""
    return tiny_triton


def _command(report: Path, *flags: str) -> list[str]:
    return [CLI, "loadtest", *flags, *SHORT, "--report", str(report)]


def _checked_report(folder: Path, target_says: str) -> dict[str, Any]:
    """report.json/md/png of a run that really loaded both models: plausible, non-zero figures."""
    report = json.loads((folder / "report.json").read_text())
    assert target_says in report["run"]["target"], report["run"]
    assert list(report["models"]) == list(MODELS)
    for model in MODELS:
        entry = report["models"][model]
        assert entry["requests"] > 0 and entry["errors"] == 0, (model, entry, report["run"]["errors_by_code"])
        assert entry["throughput_rps"] > 0
        latency = entry["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"], (model, latency)
        assert latency["mean"] > 0
    assert set(report["ratios"]) == {"lora/base"}
    assert all(math.isfinite(v) and v > 0 for v in report["ratios"]["lora/base"].values()), report["ratios"]
    assert "| lora/base |" in (folder / "report.md").read_text()
    assert (folder / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_direct_triton(triton: LocalTriton, tmp_path: Path) -> None:
    """`--direct-triton`: uint8 crops straight to Triton's KServe gRPC, no gateway."""
    _run(_command(tmp_path / "report", "--target", triton.grpc_url, "--direct-triton", "--duration", "1.5"))
    _checked_report(tmp_path / "report", "Triton")


@pytest.mark.subprocess
def test_in_process(tiny_repository: Path, tmp_path: Path) -> None:
    """`--in-process REPOSITORY`: ONNX Runtime in the load tester itself, stopped by `--requests`."""
    _run(_command(tmp_path / "report", "--in-process", str(tiny_repository), "--requests", "40",
                  "--duration", "30", "--concurrency", "2"))
    report = _checked_report(tmp_path / "report", "in-process ONNX Runtime")
    assert sum(report["models"][m]["requests"] for m in MODELS) == 40


async def test_raw_crops_to_the_gateway(triton: LocalTriton, tiny_repository: Path, tmp_path: Path) -> None:
    """`--raw`: RGB crops at the model's size to a real gateway (which decodes nothing)."""
    async with in_process_gateway(triton.grpc_url, tiny_repository, metrics_port=-1) as (gateway, _stub):
        process = await asyncio.create_subprocess_exec(
            *_command(tmp_path / "report", "--target", f"127.0.0.1:{gateway.port}", "--raw", "--duration", "1.5"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, stderr.decode()
    _checked_report(tmp_path / "report", "(raw RGB)")


def _wait_scraping(url: str, job: str, timeout_s: float = 30.0) -> None:
    """Until Prometheus has scraped `job` once: it starts scraping seconds after it is ready,
    and a run over before the first scrape has no server-side figures at all."""
    from cliplora.loadtest.prom import query

    deadline = time.monotonic() + timeout_s
    while not any(row["value"][1] == "1" for row in query(url, f'up{{job="{job}"}}', time.time())):
        assert time.monotonic() < deadline, f"Prometheus did not scrape {job} within {timeout_s:.0f} s"
        time.sleep(0.2)


def test_direct_triton_verdict_needs_only_triton_figures(triton: LocalTriton, tmp_path: Path) -> None:
    """With `--direct-triton` no gateway saw the load, so its figures cannot exist: the verdict
    requires Triton's compute figure alone, and is computed from it."""
    tools.require("prometheus")
    from cliplora.serve.stack.prometheus import LocalPrometheus, render_config

    bound = 10.0
    prometheus = LocalPrometheus(render_config(f"127.0.0.1:{free_port()}", f"127.0.0.1:{triton.ports.metrics}",
                                               interval="1s"), port=free_port())
    try:
        prometheus.start()
        _wait_scraping(prometheus.url, "triton")
        _run(_command(tmp_path / "report", "--target", triton.grpc_url, "--direct-triton", "--duration", "3",
                      "--prometheus", prometheus.url, "--scrape-wait", "2", "--overhead-bound", str(bound)))
    finally:
        prometheus.cleanup()
    report = _checked_report(tmp_path / "report", "Triton")
    assert report["prometheus"]["gateway"] == {}
    compute = {m: report["prometheus"]["triton"][m]["compute_ms_per_inference"] for m in MODELS}
    expected = compute["lora"] / compute["base"]
    assert report["verdict"]["required"] == ["triton.compute_ms_per_inference"]
    comparison = report["verdict"]["comparisons"]["lora/base"]
    assert comparison["missing"] == [] and comparison["computed"] is True
    assert comparison["triton_compute_ms_per_inference_ratio"] == pytest.approx(expected)
    assert comparison["within_bound"] is (expected <= 1 + bound)
    assert report["verdict"]["passed"] is comparison["within_bound"]
