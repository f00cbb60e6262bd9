"""One model through both of the gateway's doors, gRPC and the HTTP door's JSON, interleaved,
through the full stack.

    .venv/bin/python benchmarks/http_door.py --work /tmp/http-door --output OUTPUT_FOLDER

What it does, on one machine (docs/benchmarks.md, "HTTP door"):

1. ``python -m cliplora.demo --repository WORK/repo``: the demo models of `make serve`
   (ViT-B/16; nothing is exported when the repository already has them).
2. `cliplora serve` on that repository with ports of its own (gRPC, HTTP, metrics,
   Prometheus, Triton's three), none of the defaults, so a stack beside it does not clash;
   ``HTTP_BENCH_PORT_OFFSET`` moves them all.
3. For each ``--concurrency`` C, ``--repetitions`` times: `cliplora loadtest --target G
   --http-target H --models M,http:M --concurrency C`: the same model and the same images,
   requests alternating one by one between gRPC ``Classify`` and JSON ``POST /v1/classify``,
   so the drift of a shared machine hits both doors alike. The machine's load average is
   sampled every 5 s during each run.
4. Once, M through gRPC alone at the first C (``--check-duration`` s): the gRPC side's own
   throughput, to hold the interleaved run's total against.

Writes ``http_door.json`` (every figure, every command, the load averages) and
``http_door.md`` into ``--output``, each load test's report folder beside them.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bank_load import ratio_text, record_header, run, write_record  # what the benchmarks share
from PIL import Image

CLI = str(Path(sys.executable).with_name("cliplora"))
_OFFSET = int(os.environ.get("HTTP_BENCH_PORT_OFFSET", "0"))
GRPC_PORT, HTTP_PORT, METRICS_PORT, PROMETHEUS_PORT = (port + _OFFSET for port in (51251, 8281, 9551, 9291))
TRITON_PORTS = ",".join(str(port + _OFFSET) for port in (18200, 18201, 18202))
GRPC, HTTP = f"127.0.0.1:{GRPC_PORT}", f"127.0.0.1:{HTTP_PORT}"
LOAD_SAMPLE_S = 5.0


def start_stack(repo: Path, log_dir: Path) -> subprocess.Popen[bytes]:
    command = [CLI, "serve", "--repository", str(repo), "--log-dir", str(log_dir), "--grpc-port", str(GRPC_PORT),
               "--http-port", str(HTTP_PORT), "--metrics-port", str(METRICS_PORT),
               "--prometheus-port", str(PROMETHEUS_PORT), "--triton-ports", TRITON_PORTS]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log_dir / "serve.log", "ab"))  # noqa: SIM115


def until_both_doors_answer(model: str, timeout_s: float = 900) -> float:
    """Poll until `model` answers through gRPC and through the HTTP door; seconds waited."""
    import grpc

    from cliplora.v1 import classifier_pb2 as pb
    from cliplora.v1 import classifier_pb2_grpc as pb_grpc

    started = time.perf_counter()
    image = _small_png()
    body = json.dumps({"model": model, "images": [{"b64": base64.b64encode(image).decode()}]}).encode()
    request = urllib.request.Request(f"http://{HTTP}/v1/classify", data=body,
                                     headers={"Content-Type": "application/json"})
    with grpc.insecure_channel(GRPC) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        while True:
            try:
                stub.Classify(pb.ClassifyRequest(model=model, images=[pb.Image(encoded=image)]), timeout=30)
                with urllib.request.urlopen(request, timeout=30) as answer:
                    json.loads(answer.read())
                return time.perf_counter() - started
            except (grpc.RpcError, OSError):
                if time.perf_counter() - started > timeout_s:
                    raise
                time.sleep(1.0)


def _small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def loadtest(args: argparse.Namespace, name: str, models: str, concurrency: int, duration: float,
             *extra: str) -> dict:
    """`cliplora loadtest` into `args.output / name`, the load average sampled while it runs:
    its command, its report.json, and the load averages (1, 5, 15 min) before, during, after."""
    command = [CLI, "loadtest", "--target", GRPC, "--models", models, "--concurrency", str(concurrency),
               "--duration", str(duration), "--warmup", str(args.warmup), "--report", str(args.output / name),
               "--quiet", *extra]
    before, during = os.getloadavg(), []
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    while True:
        try:
            process.wait(LOAD_SAMPLE_S)
            break
        except subprocess.TimeoutExpired:
            during.append(os.getloadavg()[0])
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    report = json.loads((args.output / name / "report.json").read_text())
    return {"command": " ".join(command), "report": report, "load_average_before": list(before),
            "load_average_during_1min": during, "load_average_after": list(os.getloadavg())}


def compared(run_: dict, model: str) -> dict:
    """One interleaved run: each door's figures, and HTTP over gRPC: throughput (the
    loadtest's ratio of service rates), p50 and p99 with their 95% intervals, p90 as the
    ratio of the two p90s (the loadtest gives it no interval)."""
    report = run_["report"]
    key = f"http:{model}/{model}"
    grpc_side, http_side = report["models"][model], report["models"][f"http:{model}"]
    intervals = report["intervals"]["ratios"][key]
    ratios = {figure: {"value": value, "ci95": [intervals[figure]["low"], intervals[figure]["high"]]}
              for figure, value in report["ratios"][key].items()}
    ratios["p90"] = {"value": http_side["latency_ms"]["p90"] / grpc_side["latency_ms"]["p90"], "ci95": None}
    return {"command": run_["command"], "grpc": grpc_side, "http": http_side, "ratios": ratios,
            "errors_by_code": report["run"]["errors_by_code"], "measured_seconds": report["run"]["measured_seconds"],
            "load_average_before": run_["load_average_before"], "load_average_after": run_["load_average_after"],
            "load_average_during_1min": run_["load_average_during_1min"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (repository, logs); reused")
    parser.add_argument("--output", type=Path, required=True, help="where the records go")
    parser.add_argument("--model", default="pets-base", help="the demo model to load (default pets-base)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4],
                        help="comma-separated (default 2,4)")
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--check-duration", type=float, default=30.0,
                        help="seconds of the gRPC-only run (0: none; default 30)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    repo, logs = args.work / "repo", args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)
    demo = [sys.executable, "-m", "cliplora.demo", "--repository", str(repo)]
    prepared = {"command": " ".join(demo), "seconds": round(run(demo), 1)}
    stack = start_stack(repo, logs)
    runs, check = [], None
    try:
        ready_after = until_both_doors_answer(args.model)
        for concurrency in args.concurrency:
            for repetition in range(1, args.repetitions + 1):
                measured = loadtest(args, f"c{concurrency}-r{repetition}", f"{args.model},http:{args.model}",
                                    concurrency, args.duration, "--http-target", HTTP)
                runs.append({"concurrency": concurrency, "repetition": repetition, **compared(measured, args.model)})
                print(json.dumps({k: runs[-1][k] for k in ("concurrency", "repetition", "ratios")}), flush=True)
        if args.check_duration > 0:
            check = loadtest(args, f"grpc-only-c{args.concurrency[0]}", args.model, args.concurrency[0],
                             args.check_duration)
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(120)
    record = {**record_header(), "model": args.model, "prepared": prepared, "ready_after_s": round(ready_after, 1),
              "ports": {"grpc": GRPC_PORT, "http": HTTP_PORT, "metrics": METRICS_PORT, "prometheus": PROMETHEUS_PORT,
                        "triton": TRITON_PORTS},
              "runs": runs, "grpc_only": check and {"concurrency": args.concurrency[0], "command": check["command"],
                                                    "figures": check["report"]["models"][args.model],
                                                    "load_average_before": check["load_average_before"],
                                                    "load_average_after": check["load_average_after"]}}
    write_record(args.output, "http_door", record, markdown)
    return 0


def markdown(record: dict) -> str:
    lines = [f"# HTTP door vs gRPC, interleaved ({record['model']}, {record['date']})", "",
             f"`{record['command']}`", "", f"Machine: {record['machine']}.", "",
             "| C | run | gRPC req/s | HTTP req/s | gRPC p50 ms | HTTP p50 ms | throughput HTTP/gRPC [95% CI] | "
             "p50 [95% CI] | p90 | p99 [95% CI] | errors | load average (1 min: before, during, after) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        ratios, during = r["ratios"], r["load_average_during_1min"]
        errors = r["grpc"]["errors"] + r["http"]["errors"]
        lines.append(f"| {r['concurrency']} | {r['repetition']} | {r['grpc']['throughput_rps']:.2f} | "
                     f"{r['http']['throughput_rps']:.2f} | {r['grpc']['latency_ms']['p50']:.1f} | "
                     f"{r['http']['latency_ms']['p50']:.1f} | {ratio_text(ratios['throughput'])} | "
                     f"{ratio_text(ratios['p50'])} | {ratios['p90']['value']:.3f} | {ratio_text(ratios['p99'])} | {errors} | "
                     f"{r['load_average_before'][0]:.1f}, {min(during, default=0):.1f}-{max(during, default=0):.1f}, "
                     f"{r['load_average_after'][0]:.1f} |")
    check = record["grpc_only"]
    if check:
        figures = check["figures"]
        lines += ["", f"gRPC alone at concurrency {check['concurrency']}: {figures['throughput_rps']:.2f} req/s, "
                      f"p50 {figures['latency_ms']['p50']:.1f} ms (load average {check['load_average_before'][0]:.1f} "
                      f"-> {check['load_average_after'][0]:.1f}); `{check['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
