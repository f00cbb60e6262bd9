"""Promotion under load: hot bank adapters served merged, the long tail from the bank.

    .venv/bin/python benchmarks/bank_promotion.py --work /tmp/bank-promotion --output OUTPUT_FOLDER

What it does, on one machine (docs/benchmarks.md, "Promotion"):

1. The plain base classifier ``base`` and a bank ``bank`` of the same base (random weights,
   10 classes, `--target`) with `--adapters` adapters (`cliplora bank add --adapters-file`,
   ViT-sized CLIP-LoRA checkpoints as benchmarks/bank_bench.py writes them), then
   `cliplora serve` on the repository.
2. **The crossover**: for each P of `--promoted` (e.g. 0, 4, 16), the P hottest adapters
   of a Zipf(S) draw over the bank's adapters (the first ones: `cliplora loadtest
   --adapter-skew` draws the first adapter most often) promoted (`cliplora bank promote`),
   then `cliplora loadtest --models base,bank@* --adapter-skew zipf:S`: throughput and p50
   against the base, interleaved, and the resident memory of Triton with its backend
   processes.
3. **A promoted adapter's cost**: `cliplora loadtest --models base,bank@HOT,bank@COLD` with
   the hottest adapter promoted and a cold one not: the promoted one should cost what the
   base costs, the cold one the bank's cost.

Writes ``bank_promotion.json`` and ``bank_promotion.md`` into `--output`, and each load
test's report folder beside them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import psutil
from bank_bench import towers, write_adapter
from bank_load import (
    CLI,
    GRPC_PORT,
    TRITON_PORTS,
    load_arguments,
    new_work,
    ratio_text,
    record_header,
    run,
    run_loadtest,
    start_stack,
    until_answered,
    write_record,
)


def triton_rss_mb() -> float:
    """Resident memory of the local Triton (found by its gRPC port) and everything under it."""
    grpc_port = TRITON_PORTS.split(",")[1]
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "tritonserver" and f"--grpc-port={grpc_port}" in (process.info["cmdline"] or []):
            tree = [process, *process.children(recursive=True)]
            return round(sum(p.memory_info().rss for p in tree) / 1e6, 1)
    raise RuntimeError("no tritonserver with the benchmark's ports")


def triton_requests() -> dict[str, int]:
    """Triton's successful requests per model, all versions together (its metrics port)."""
    import re
    import urllib.request

    metrics_port = TRITON_PORTS.split(",")[2]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: dict[str, int] = {}
    for model, value in re.findall(r'^nv_inference_request_success\{model="([^"]+)",version="\d+"\} (\d+)', text, re.M):
        counts[model] = counts.get(model, 0) + int(value)
    return counts


def prepare(args: argparse.Namespace, repo: Path, classes: Path) -> list[dict]:
    target = ["--target", args.target]
    widths = towers(args.model)
    entries = [{"adapter": f"a{i}", "lora": str(write_adapter(args.work / f"a{i}.pt", i, widths)),
                "classes": str(classes)} for i in range(args.adapters)]
    step = args.work / "adapters.json"
    step.write_text(json.dumps(entries))
    commands = [
        [CLI, "export", "--model", args.model, "--allow-random-weights", "--lora", "none", "--classes", str(classes),
         "--name", "base", "--repository", str(repo), "--quiet", *target,
         *(["--uncalibrated"] if args.target == "cpu-int8" else [])],
        [CLI, "bank", "create", "bank", "--model", args.model, "--allow-random-weights", "--classes", str(classes),
         "--repository", str(repo), "--quiet", *target],
        [CLI, "bank", "add", "bank", "--adapters-file", str(step), "--repository", str(repo), "--quiet",
         "--probes", str(args.probes)],
    ]
    return [{"command": " ".join(c), "seconds": round(run(c), 1)} for c in commands]


def promote(args: argparse.Namespace, repo: Path, adapters: list[str]) -> list[dict]:
    rows = []
    widths = towers(args.model)
    for adapter in adapters:
        lora = args.work / f"{adapter}.pt"
        if not lora.exists():  # bank_load.py deletes its adapters once added; the same seed writes the same file
            write_adapter(lora, int(adapter[1:]), widths)
        command = [CLI, "bank", "promote", "bank", "--adapter", adapter, "--repository", str(repo), "--quiet"]
        seconds = run(command)
        rows.append({"command": " ".join(command), "seconds": round(seconds, 1)})
        until_promoted(adapter)
    return rows


def until_promoted(adapter: str, timeout_s: float = 600) -> None:
    """Until the gateway lists the adapter as promoted (its merged classifier is ready)."""
    import grpc

    from cliplora.v1 import classifier_pb2 as pb
    from cliplora.v1 import classifier_pb2_grpc as pb_grpc

    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        while time.monotonic() - started < timeout_s:
            listing = stub.ListModels(pb.ListModelsRequest(), timeout=30)
            bank = next((m for m in listing.models if m.name == "bank"), None)
            if bank is not None and any(a.id == adapter and a.promoted_to for a in bank.adapters):
                return
            time.sleep(1)
    raise TimeoutError(f"adapter {adapter} not promoted after {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--target", choices=("portable", "cpu-int8"), default="portable")
    parser.add_argument("--work", type=Path, required=True,
                        help="a scratch folder; one benchmarks/bank_load.py left (its repository, a bank of at least "
                             "--adapters adapters) is used as it is")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--adapters", type=int, default=256)
    parser.add_argument("--promoted", type=lambda s: [int(x) for x in s.split(",")], default=[0, 4, 16])
    parser.add_argument("--skew", default="zipf:1.1")
    parser.add_argument("--probes", type=int, default=2, help="probe images each added adapter is verified on")
    load_arguments(parser)
    args = parser.parse_args()
    repo, logs = args.work / "repo", args.work / "logs"
    if repo.is_dir():  # made by benchmarks/bank_load.py: its base and its bank, adapters a0, a1, ...
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        args.output.mkdir(parents=True, exist_ok=True)
        prepared = [{"reused": f"{repo}: base and bank made by benchmarks/bank_load.py"}]
    else:
        repo, classes, logs = new_work(args)
        prepared = prepare(args, repo, classes)
    stack = start_stack(repo, logs)
    crossover, promotions = [], []
    try:
        until_answered(f"a{args.adapters - 1}")
        have = 0
        for count in args.promoted:
            promotions += promote(args, repo, [f"a{i}" for i in range(have, count)])
            have = count
            time.sleep(5)  # the previous versions unloaded: memory as it stays
            row = run_loadtest(args, f"crossover-{count}", "base,bank@*", "--adapter-skew", args.skew)
            crossover.append({"promoted": count, "triton_rss_mb": triton_rss_mb(), **row})
            print({"promoted": count, "ratios": row["ratios"], "rss": crossover[-1]["triton_rss_mb"]}, flush=True)
        before = triton_requests()
        cost = run_loadtest(args, "promoted-cost", f"base,bank@a0,bank@a{args.adapters - 1}")
        after = triton_requests()
        # Which Triton models answered: the promoted adapter's requests must reach bank--a0.
        cost["triton_requests"] = {m: after[m] - before.get(m, 0) for m in after if after[m] != before.get(m, 0)}
        print(cost["ratios"], flush=True)
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(120)
    record = {**record_header(), "model": args.model, "target": args.target, "adapters": args.adapters, "skew": args.skew,
              "prepared": prepared, "promotions": promotions, "crossover": crossover, "promoted_cost": cost}
    write_record(args.output, "bank_promotion", record, markdown)
    return 0


def markdown(record: dict) -> str:
    lines = [f"# Promotion under load ({record['model']}, {record['target']}, {record['adapters']} adapters, "
             f"{record['date']})", "", f"`{record['command']}`", "", f"Machine: {record['machine']}.", "",
             f"Requests {record['skew']}-distributed over the bank's adapters, interleaved with the plain base model:",
             "", "| promoted | bank@* throughput / base [95% CI] | p50 ratio [95% CI] | Triton RSS MB | load average |",
             "|---|---|---|---|---|"]
    for row in record["crossover"]:
        ratio = row["ratios"]["bank@*"]
        lines.append(f"| {row['promoted']} | {ratio_text(ratio['throughput'])} | {ratio_text(ratio['p50'])} | "
                     f"{row['triton_rss_mb']} | {row['load_average_before']:.1f} -> {row['load_average_after']:.1f} |")
    cost = record["promoted_cost"]
    lines += ["", f"One promoted adapter against the base, beside a cold one (`{cost['command']}`):", "",
              "| entry | p50 ratio vs base [95% CI] | throughput ratio [95% CI] |", "|---|---|---|"]
    for entry, ratio in cost["ratios"].items():
        lines.append(f"| {entry} | {ratio_text(ratio['p50'])} | {ratio_text(ratio['throughput'])} |")
    lines += ["", "Triton requests per model during that run: "
              + ", ".join(f"{model} {count}" for model, count in sorted(cost.get("triton_requests", {}).items()))]
    lines += ["", "| promotion | seconds |", "|---|---|"]
    lines += [f"| `{p['command'].split(' bank promote ')[1].split(' --repository')[0]}` | {p['seconds']} |"
              for p in record["promotions"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
