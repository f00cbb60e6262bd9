"""Request-time labels on a banked adapter against its fixed labels, through the full stack.

    .venv/bin/python benchmarks/bank_labels.py --work /tmp/bank-labels --output OUTPUT_FOLDER

What it does, on one machine (docs/benchmarks.md, "Labels on a banked adapter"):

1. `cliplora bank create --open-vocabulary` a bank (random weights, 10 classes) and
   `cliplora bank add` one adapter that changes both towers (as benchmarks/bank_bench.py
   writes them), then `cliplora serve` on the repository.
2. `cliplora loadtest --models bank@a0,bank@a0:labels --labels-file CLASSES`: the adapter
   with its fixed class embeddings, interleaved one by one with the same adapter asked the
   same 10 names as request-time labels. The labels are the same every request, so after
   the first their prompt embeddings come from the gateway's text cache (warm): what is
   left is the image tower, which both entries run, and a [10, D] product.

Writes ``bank_labels.json`` and ``bank_labels.md`` into `--output`, and the load test's
report folder beside them.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from bank_bench import towers, write_adapter
from bank_load import (
    CLI,
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


def prepare(args: argparse.Namespace, repo: Path, classes: Path) -> list[dict]:
    adapter = write_adapter(args.work / "a0.pt", 0, towers(args.model))
    commands = [
        [CLI, "bank", "create", "bank", "--open-vocabulary", "--model", args.model, "--allow-random-weights",
         "--classes", str(classes), "--repository", str(repo), "--quiet"],
        [CLI, "bank", "add", "bank", "--adapter", "a0", "--lora", str(adapter), "--classes", str(classes),
         "--repository", str(repo), "--quiet", "--probes", str(args.probes)],
    ]
    return [{"command": " ".join(c), "seconds": round(run(c), 1)} for c in commands]


def loadtest(args: argparse.Namespace, classes: Path) -> dict:
    row = run_loadtest(args, "labels-vs-fixed", "bank@a0,bank@a0:labels", "--labels-file", str(classes))
    return {"loadtest_command": row["command"], "fixed": row["models"]["bank@a0"],
            "labels": row["models"]["bank@a0:labels"], "ratios": row["ratios"]["bank@a0:labels"],
            "load_average_before": row["load_average_before"], "load_average_after": row["load_average_after"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name or JSON config (default ViT-B-16)")
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (repository, adapter, logs)")
    parser.add_argument("--output", type=Path, required=True, help="where the records go")
    parser.add_argument("--probes", type=int, default=2, help="probe images the adapter is verified on (default 2)")
    load_arguments(parser)
    args = parser.parse_args()
    repo, classes, logs = new_work(args)
    prepared = prepare(args, repo, classes)
    stack = start_stack(repo, logs)
    try:
        until_answered("a0")
        result = loadtest(args, classes)
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(120)
    record = {**record_header(), "model": args.model, "prepared": prepared, **result}
    write_record(args.output, "bank_labels", record, markdown)
    return 0


def markdown(record: dict) -> str:
    p50, tput = record["ratios"]["p50"], record["ratios"]["throughput"]
    return "\n".join([
        f"# Request-time labels on a banked adapter ({record['model']}, {record['date']})", "",
        f"`{record['command']}`", "", f"Machine: {record['machine']}.", "",
        f"Load test: `{record['loadtest_command']}`", "",
        "| entry | p50 ms | p99 ms | throughput /s |", "|---|---|---|---|",
        *(f"| {name} | {m['latency_ms']['p50']:.1f} | {m['latency_ms']['p99']:.1f} | {m['throughput_rps']:.2f} |"
          for name, m in (("bank@a0 (fixed)", record["fixed"]), ("bank@a0:labels (warm)", record["labels"]))),
        "", f"labels / fixed: p50 {ratio_text(p50)}, throughput {ratio_text(tput)}; load average "
        f"{record['load_average_before']:.1f} -> {record['load_average_after']:.1f}", ""])


if __name__ == "__main__":
    sys.exit(main())
