"""Adapter banks under load through the full stack, interleaved against the plain base model.

    .venv/bin/python benchmarks/bank_load.py --work /tmp/bank-load --output OUTPUT_FOLDER

What it does, on one machine (docs/benchmarks.md, "Adapter banks under load"):

1. `cliplora export --lora none` the base model as a plain classifier (``base``) and
   `cliplora bank create` a bank of the same base (``bank``), both `--target` (portable
   fp32, or cpu-int8), random weights (latency does not depend on them), 10 classes.
2. `cliplora serve` on that repository: Triton, the gateway and Prometheus.
3. For each of `--sizes` K: `cliplora bank add --adapters-file` up to K adapters (ViT-sized
   CLIP-LoRA checkpoints: both towers, q/k/v, every block, rank 2), wait until the gateway
   answers for the newest one, then `cliplora loadtest --models base,bank@*` twice:
   requests spread round robin over the K adapters, then Zipf-distributed (`--adapter-skew
   zipf:S`). Base and bank requests interleave one by one, so drift hits both alike.

Writes ``bank_load.json`` (every figure, every command) and ``bank_load.md`` into `--output`,
and each load test's own report folder beside them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psutil
from bank_bench import towers, write_adapter  # the same adapters as the memory benchmark
from PIL import Image

from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc

CLI = str(Path(sys.executable).with_name("cliplora"))
# BANK_BENCH_PORT_OFFSET moves every port, for a second benchmark beside a running one.
_OFFSET = int(os.environ.get("BANK_BENCH_PORT_OFFSET", "0"))
GRPC_PORT, METRICS_PORT, PROMETHEUS_PORT = 51151 + _OFFSET, 9451 + _OFFSET, 9191 + _OFFSET
TRITON_PORTS = ",".join(str(port + _OFFSET) for port in (18100, 18101, 18102))


def run(command: list[str]) -> float:
    """Run a CLI command to the end; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def load_arguments(parser: argparse.ArgumentParser) -> None:
    """Each `cliplora loadtest` run's settings, the same in every bank benchmark."""
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0)


def new_work(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(repository, classes file, logs folder) in a new `args.work`; `args.output` made;
    SIGTERM ends the run through the callers' `finally` (the stack is stopped)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.work.mkdir(parents=True, exist_ok=False)
    args.output.mkdir(parents=True, exist_ok=True)
    repo, classes, logs = args.work / "repo", args.work / "classes.txt", args.work / "logs"
    logs.mkdir()
    classes.write_text("".join(f"class_{i}\n" for i in range(10)))
    return repo, classes, logs


def prepare(args: argparse.Namespace, repo: Path, classes: Path) -> list[dict]:
    target = ["--target", args.target] + (["--uncalibrated"] if args.target == "cpu-int8" else [])
    commands = [
        [CLI, "export", "--model", args.model, "--allow-random-weights", "--lora", "none", "--classes", str(classes),
         "--name", "base", "--repository", str(repo), "--quiet", *target],
        [CLI, "bank", "create", "bank", "--model", args.model, "--allow-random-weights", "--classes", str(classes),
         "--repository", str(repo), "--quiet", "--target", args.target],
    ]
    return [{"command": " ".join(c), "seconds": round(run(c), 1)} for c in commands]


def start_stack(repo: Path, log_dir: Path) -> subprocess.Popen[bytes]:
    command = [CLI, "serve", "--repository", str(repo), "--log-dir", str(log_dir), "--grpc-port", str(GRPC_PORT),
               "--metrics-port", str(METRICS_PORT), "--prometheus-port", str(PROMETHEUS_PORT),
               "--triton-ports", TRITON_PORTS, "--http-port", "0"]
    stack = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log_dir / "serve.log", "ab"))  # noqa: SIM115
    return stack


def until_answered(adapter: str, timeout_s: float = 900) -> float:
    """Poll the gateway until `adapter` (or the base model, for "") answers; seconds waited."""
    started = time.perf_counter()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, "PNG")
    image = pb.Image(encoded=buffer.getvalue())
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        while True:
            try:
                if adapter:
                    stub.Classify(pb.ClassifyRequest(model="bank", adapter=adapter, images=[image]), timeout=30)
                else:
                    stub.Classify(pb.ClassifyRequest(model="base", images=[image]), timeout=30)
                return time.perf_counter() - started
            except grpc.RpcError:
                if time.perf_counter() - started > timeout_s:
                    raise
                time.sleep(0.5)


def add_step(args: argparse.Namespace, repo: Path, classes: Path, have: int, size: int) -> dict:
    widths = towers(args.model)
    entries = [{"adapter": f"a{i}", "lora": str(write_adapter(args.work / f"a{i}.pt", i, widths)),
                "classes": str(classes)} for i in range(have, size)]
    step = args.work / f"step-{size}.json"
    step.write_text(json.dumps(entries))
    command = [CLI, "bank", "add", "bank", "--adapters-file", str(step), "--repository", str(repo), "--quiet",
               "--probes", str(args.probes)]
    seconds = run(command)
    for path in (args.work / f"a{i}.pt" for i in range(have, size)):
        path.unlink()
    waited = until_answered(f"a{size - 1}")
    return {"adapters": size, "added": size - have, "add_seconds": round(seconds, 1),
            "then_answering_after_s": round(waited, 1), "command": " ".join(command)}


def run_loadtest(args: argparse.Namespace, name: str, models: str, *extra: str) -> dict:
    """`cliplora loadtest --models MODELS` against the stack into `args.output / name`: its
    command, each entry's figures, each entry's ratios to the first with their 95%
    intervals, and the machine's load average before and after."""
    report = args.output / name
    command = [CLI, "loadtest", "--target", f"127.0.0.1:{GRPC_PORT}", "--models", models,
               "--concurrency", str(args.concurrency), "--duration", str(args.duration), "--warmup", str(args.warmup),
               "--report", str(report), "--quiet", *extra]
    load_before = os.getloadavg()[0]
    run(command)
    result = json.loads((report / "report.json").read_text())
    intervals = result["intervals"]["ratios"]
    ratios = {key.split("/")[0]: {figure: {"value": value, "ci95": [intervals[key][figure]["low"],
                                                                    intervals[key][figure]["high"]]}
                                  for figure, value in figures.items()}
              for key, figures in result["ratios"].items()}
    return {"command": " ".join(command), "models": result["models"], "ratios_vs": models.split(",")[0],
            "ratios": ratios, "load_average_before": load_before, "load_average_after": os.getloadavg()[0]}


def load(args: argparse.Namespace, size: int, skew: str | None) -> dict:
    spread = skew or "uniform"
    row = run_loadtest(args, f"k{size}-{'zipf' if skew else 'uniform'}", "base,bank@*",
                       *(["--adapter-skew", skew] if skew else []))
    return {"adapters": size, "spread": spread, "command": row["command"], "base": row["models"]["base"],
            "bank": row["models"]["bank@*"], "ratios": row["ratios"]["bank@*"],
            "load_average_before": row["load_average_before"], "load_average_after": row["load_average_after"]}


def record_header() -> dict:
    """What every benchmark record starts with: when, the command, the machine."""
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB"}


def write_record(output: Path, stem: str, record: dict, markdown: Callable[[dict], str]) -> None:
    """`stem`.json (every figure) and `stem`.md (the table) into `output`; the table printed."""
    (output / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (output / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name or JSON config (default ViT-B-16)")
    parser.add_argument("--target", choices=("portable", "cpu-int8"), default="portable")
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (repository, adapters, logs)")
    parser.add_argument("--output", type=Path, required=True, help="where the records go")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 256, 1024])
    parser.add_argument("--skew", default="zipf:1.1", help="the skewed run's --adapter-skew (default zipf:1.1)")
    parser.add_argument("--probes", type=int, default=2,
                        help="probe images each added adapter is verified on (default 2: what is measured here is "
                             "serving, not adding; `cliplora bank add` defaults to 8)")
    load_arguments(parser)
    args = parser.parse_args()
    repo, classes, logs = new_work(args)
    prepared = prepare(args, repo, classes)
    stack = start_stack(repo, logs)
    steps, runs = [], []
    try:
        until_answered("")
        have = 0
        for size in args.sizes:
            steps.append(add_step(args, repo, classes, have, size))
            print(steps[-1], flush=True)
            have = size
            for skew in (None, args.skew):
                runs.append(load(args, size, skew))
                print({k: runs[-1][k] for k in ("adapters", "spread", "ratios")}, flush=True)
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(120)
    record = {**record_header(), "model": args.model, "target": args.target, "prepared": prepared,
              "steps": steps, "runs": runs}
    write_record(args.output, "bank_load", record, markdown)
    return 0


def markdown(record: dict) -> str:
    lines = [f"# Adapter banks under load ({record['model']}, {record['target']}, {record['date']})", "",
             f"`{record['command']}`", "", f"Machine: {record['machine']}.", "",
             "| adapters | spread | base p50 ms | bank p50 ms | p50 ratio [95% CI] | throughput ratio [95% CI] | "
             "load average |", "|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        p50, tput = r["ratios"]["p50"], r["ratios"]["throughput"]
        lines.append(f"| {r['adapters']} | {r['spread']} | {r['base']['latency_ms']['p50']:.1f} | "
                     f"{r['bank']['latency_ms']['p50']:.1f} | {ratio_text(p50)} | {ratio_text(tput)} | "
                     f"{r['load_average_before']:.1f} -> {r['load_average_after']:.1f} |")
    lines += ["", "| adapters | added | `bank add` s | answering after s |", "|---|---|---|---|"]
    lines += [f"| {s['adapters']} | {s['added']} | {s['add_seconds']} | {s['then_answering_after_s']} |"
              for s in record["steps"]]
    return "\n".join(lines) + "\n"


def ratio_text(ratio: dict) -> str:
    """A ratio and its 95% interval, as the records' markdown shows them."""
    low, high = ratio["ci95"]
    return f"{ratio['value']:.3f} [{low:.3f}, {high:.3f}]"


if __name__ == "__main__":
    sys.exit(main())
