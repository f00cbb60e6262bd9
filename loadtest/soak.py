"""`make soak`: hold ~80% of measured capacity for minutes; report errors and gateway RSS.

    python -m cliplora.loadtest.soak --repository model_repository --model pets-base --minutes 10 --report bench/soak

Starts `cliplora serve` (Triton + gateway) on its default ports, measures capacity with
a short closed-loop run (concurrency 2), then sends an open-loop load at
``fraction x capacity`` for `minutes`, sampling the gateway process's resident memory
every 5 s. Writes ``soak.json`` and ``soak.md`` into the report folder, and stops the
stack afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cliplora.loadtest.cli import generated_images
from cliplora.loadtest.runner import run_load
from cliplora.loadtest.stats import summary_ms
from cliplora.loadtest.targets import GatewayTarget

SAMPLE_EVERY_S = 5.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def _wait_serving(target: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError("the stack did not become ready")


async def soak(args: argparse.Namespace, gateway_pid: int) -> dict:
    target = "127.0.0.1:50051"
    await _wait_serving(target)
    images = generated_images()
    gateway = GatewayTarget(target, images)  # one channel for the capacity probe and the soak
    await gateway.start([args.model])
    try:
        return await _probe_and_soak(args, gateway, gateway_pid)
    finally:
        await gateway.close()


async def _probe_and_soak(args: argparse.Namespace, gateway: GatewayTarget, gateway_pid: int) -> dict:
    capacity_run = await run_load(gateway, [args.model], concurrency=2, duration_s=args.probe_seconds, warmup_s=5,
                                  progress=False)
    capacity = len(capacity_run.latencies(args.model)) / capacity_run.measured_seconds
    rate = args.fraction * capacity
    print(f"capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for {args.minutes} min", file=sys.stderr)

    samples: list[tuple[float, float]] = []
    started = time.monotonic()

    async def sample() -> None:
        while True:
            samples.append((time.monotonic() - started, rss_mib(gateway_pid)))
            await asyncio.sleep(SAMPLE_EVERY_S)

    sampler = asyncio.create_task(sample())
    try:
        result = await run_load(gateway, [args.model], rate=rate, duration_s=args.minutes * 60, warmup_s=0)
    finally:
        sampler.cancel()
    samples.append((time.monotonic() - started, rss_mib(gateway_pid)))
    ok = result.latencies(args.model)
    rss = [r for _, r in samples]
    first_minute = [r for t, r in samples if t <= 60] or rss[:1]
    return {
        "model": args.model,
        "capacity_rps": capacity,
        "rate_rps": rate,
        "minutes": args.minutes,
        "requests": len(result.records),
        "errors": result.errors(args.model),
        "latency_ms": summary_ms(ok),
        "gateway_rss_mib": {"start": rss[0], "max": max(rss), "end": rss[-1],
                            "growth_after_first_minute": rss[-1] - max(first_minute)},
        "rss_samples": [{"t_s": round(t, 1), "rss_mib": round(r, 1)} for t, r in samples],
    }


def render(report: dict) -> str:
    rss = report["gateway_rss_mib"]
    lat = report["latency_ms"]
    errors = sum(report["errors"].values())
    return "\n".join([
        "# Soak",
        "",
        f"{report['model']}: capacity {report['capacity_rps']:.2f} req/s (closed loop, concurrency 2); "
        f"held {report['rate_rps']:.2f} req/s open loop for {report['minutes']} min.",
        "",
        f"- requests {report['requests']}, errors {errors} {report['errors'] or ''}",
        f"- latency p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms",
        f"- gateway RSS: start {rss['start']:.1f} MiB, max {rss['max']:.1f} MiB, end {rss['end']:.1f} MiB "
        f"(after the first minute: {rss['growth_after_first_minute']:+.1f} MiB)",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--model", default="pets-base")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--fraction", type=float, default=0.8, help="share of measured capacity (default 0.8)")
    parser.add_argument("--probe-seconds", type=float, default=30.0)
    parser.add_argument("--report", default="bench/soak")
    args = parser.parse_args(argv)
    stack = subprocess.Popen([str(Path(sys.executable).with_name("cliplora")), "serve", "--repository",
                              args.repository, "--log-dir", str(Path(args.report) / "logs")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        report = asyncio.run(soak(args, stack.pid))
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(timeout=60)
    folder = Path(args.report)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "soak.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
