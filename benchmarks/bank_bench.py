"""Adapter banks: Triton's memory per added adapter, and the time from `bank add` to the answer.

    .venv/bin/python benchmarks/bank_bench.py --work /tmp/bank-bench --output OUT

What it does, on one machine (docs/benchmarks.md, "Adapter banks"):

1. `cliplora bank create` a bank of `--model` (random weights: memory and time do not depend
   on them) with 10 classes, and start the local Triton on its repository (the local
   stack's poll interval, 2 s).
2. Memory: `cliplora bank add --adapters-file` in steps up to each of `--sizes` adapters
   (ViT-B-sized CLIP-LoRA checkpoints: both towers, q/k/v, every block, rank 2); after each
   step, once the new version answers and the previous one is unloaded, the resident
   memory (RSS) of tritonserver and its backend processes. Then one merged classifier of
   the same base is exported into the repository (`cliplora export`), for what one merged
   copy costs Triton.
3. Add time: `--adds` times, `cliplora bank add` of one adapter as a child process, timed
   from its start until the new version answers a request for the new adapter through
   Triton (polled every 50 ms).

Writes ``bank_bench.json`` (every figure and command) and ``bank_bench.md`` into `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import torch
import tritonclient.grpc as grpcclient

from cliplora.core import contract
from cliplora.model.base_model import resolve_model_config
from cliplora.serve.stack.triton_launcher import LocalTriton, TritonPorts

BANK = "bench"
CLI = str(Path(sys.executable).with_name("cliplora"))


def run(command: list[str]) -> float:
    """Run a CLI command to the end; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def towers(model: str) -> list[int]:
    """The width of each adapted block, text tower first (the paper's layer order)."""
    _, config = resolve_model_config(model)
    text, vision = config["text_cfg"], config["vision_cfg"]
    return [text.get("width", 512)] * text.get("layers", 12) + [vision["width"]] * vision["layers"]


def write_adapter(path: Path, seed: int, widths: list[int]) -> Path:
    """A CLIP-LoRA paper checkpoint: both towers, q/k/v in every block, rank 2, random."""
    generator = torch.Generator().manual_seed(seed)
    weights = {f"layer_{i}": {p: {"w_lora_A": torch.randn(2, d, generator=generator) * 0.05,
                                  "w_lora_B": torch.randn(d, 2, generator=generator) * 0.05}
                              for p in ("q_proj", "k_proj", "v_proj")} for i, d in enumerate(widths)}
    torch.save({"weights": weights, "metadata": {"r": 2, "alpha": 1.0, "encoder": "both", "params": ["q", "k", "v"],
                                                 "position": "all"}}, path)
    return path


def triton_processes(triton: LocalTriton) -> list[psutil.Process]:
    """tritonserver and every process under it (the Python backend's stubs: one per loaded version)."""
    root = psutil.Process(triton.server_pid)
    return [root, *root.children(recursive=True)]


def triton_rss_mb(triton: LocalTriton) -> float:
    """Resident memory of tritonserver and every process under it, in MB."""
    return sum(p.memory_info().rss for p in triton_processes(triton)) / 1e6


def infer(client: grpcclient.InferenceServerClient, size: int, slot: int, version: int) -> np.ndarray:
    image = grpcclient.InferInput(contract.INPUT_NAME, [1, size, size, 3], contract.INPUT_WIRE_DTYPE)
    image.set_data_from_numpy(np.full((1, size, size, 3), 128, dtype=np.uint8))
    adapter = grpcclient.InferInput(contract.BANK_ADAPTER_NAME, [1, 1], contract.BANK_ADAPTER_WIRE_DTYPE)
    adapter.set_data_from_numpy(np.array([[slot]], dtype=np.int32))
    return client.infer(BANK, [image, adapter], model_version=str(version)).as_numpy(contract.BANK_OUTPUT_NAME)


def until_answered(client: grpcclient.InferenceServerClient, size: int, slot: int, version: int,
                   timeout_s: float = 600) -> float:
    """Poll every 50 ms until `version` answers for `slot`; returns time.perf_counter() then."""
    started = time.perf_counter()
    while True:
        try:
            infer(client, size, slot, version)
            return time.perf_counter()
        except Exception:  # not loaded yet
            if time.perf_counter() - started > timeout_s:
                raise
            time.sleep(0.05)


def settle(client: grpcclient.InferenceServerClient, model: str, versions_left: int, timeout_s: float = 120) -> None:
    """Wait until Triton holds at most `versions_left` ready or unloading versions of `model`."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        index = client.get_model_repository_index(as_json=True).get("models", [])
        live = [m for m in index if m["name"] == model and m.get("state") in ("READY", "UNLOADING", "LOADING")]
        if len(live) <= versions_left:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{model} still has more than {versions_left} live versions")


def memory_steps(args: argparse.Namespace, repo: Path, classes: Path, triton: LocalTriton,
                 client: grpcclient.InferenceServerClient, size: int) -> list[dict]:
    widths = towers(args.model)
    rows, version, have = [], 1, 0
    for _ in range(3):
        infer(client, size, 0, version)
    time.sleep(2)
    rows.append({"adapters": 0, "version": 1, "triton_rss_mb": round(triton_rss_mb(triton), 1),
                 "processes": len(triton_processes(triton))})
    for size_k in args.sizes:
        entries = [{"adapter": f"m{i}", "lora": str(write_adapter(args.work / f"m{i}.pt", i, widths)),
                    "classes": str(classes)} for i in range(have, size_k)]
        step = args.work / f"step-{size_k}.json"
        step.write_text(json.dumps(entries))
        command = [CLI, "bank", "add", BANK, "--adapters-file", str(step), "--repository", str(repo), "--quiet"]
        seconds = run(command)
        version += 1
        until_answered(client, size, size_k, version)  # slots are given in order: the last one is size_k
        for _ in range(3):
            infer(client, size, size_k, version)
        settle(client, BANK, 1)
        time.sleep(2)
        rows.append({"adapters": size_k, "version": version, "added": size_k - have,
                     "add_seconds": round(seconds, 1), "triton_rss_mb": round(triton_rss_mb(triton), 1),
                     "processes": len(triton_processes(triton)), "load_average": os.getloadavg()[0],
                     "command": " ".join(command)})
        print(rows[-1], flush=True)
        have = size_k
    return rows


def add_times(args: argparse.Namespace, repo: Path, classes: Path, client: grpcclient.InferenceServerClient,
              size: int, first_version: int, first_slot: int) -> list[dict]:
    rows = []
    for i in range(args.adds):
        lora = write_adapter(args.work / f"t{i}.pt", 10_000 + i, towers(args.model))
        command = [CLI, "bank", "add", BANK, "--adapter", f"t{i}", "--lora", str(lora), "--classes", str(classes),
                   "--repository", str(repo), "--quiet"]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        answered = until_answered(client, size, first_slot + i, first_version + i)
        published = process.wait()
        if published != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({published})")
        rows.append({"adapter": f"t{i}", "version": first_version + i,
                     "seconds_to_first_answer": round(answered - started, 2), "load_average": os.getloadavg()[0],
                     "command": " ".join(command)})
        print(rows[-1], flush=True)
        settle(client, BANK, 1)
    return rows


def merged_copy(args: argparse.Namespace, repo: Path, classes: Path, triton: LocalTriton,
                client: grpcclient.InferenceServerClient) -> dict:
    """What one merged classifier of the same base adds to Triton's memory."""
    before = triton_rss_mb(triton)
    lora = write_adapter(args.work / "merged.pt", 99, towers(args.model))
    command = [CLI, "export", "--model", args.model, "--allow-random-weights", "--lora", str(lora), "--classes",
               str(classes), "--name", "merged", "--repository", str(repo), "--quiet"]
    run(command)
    started = time.perf_counter()
    while not client.is_model_ready("merged"):
        if time.perf_counter() - started > 300:
            raise TimeoutError("the merged model did not load")
        time.sleep(0.2)
    time.sleep(2)
    return {"triton_rss_mb_before": round(before, 1), "triton_rss_mb_after": round(triton_rss_mb(triton), 1),
            "command": " ".join(command)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name or JSON config (default ViT-B-16)")
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (repository, adapters)")
    parser.add_argument("--output", type=Path, required=True, help="where the records go")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 128],
                        help="adapter counts to measure memory at (default 1,16,64,128)")
    parser.add_argument("--adds", type=int, default=3, help="timed single-adapter adds (default 3)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that Triton is stopped on the way out
    args.work.mkdir(parents=True, exist_ok=False)
    args.output.mkdir(parents=True, exist_ok=True)
    repo, classes = args.work / "repo", args.work / "classes.txt"
    classes.write_text("".join(f"class_{i}\n" for i in range(10)))
    create = [CLI, "bank", "create", BANK, "--model", args.model, "--allow-random-weights", "--classes", str(classes),
              "--repository", str(repo), "--quiet"]
    create_seconds = run(create)
    size = json.loads((repo / BANK / "1" / contract.MANIFEST_FILENAME).read_text())["settings"]["image_size"]
    with LocalTriton(repo, ports=TritonPorts(18000, 18001, 18002), log_path=args.work / "triton.log") as triton:
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        until_answered(client, size, 0, 1)
        memory = memory_steps(args, repo, classes, triton, client, size)
        last = memory[-1]
        adds = add_times(args, repo, classes, client, size, last["version"] + 1, last["adapters"] + 1)
        merged = merged_copy(args, repo, classes, triton, client)
    record = summarize(args, create, create_seconds, memory, adds, merged)
    (args.output / "bank_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.output / "bank_bench.md").write_text(markdown(record))
    print(markdown(record))
    return 0


def summarize(args: argparse.Namespace, create: list[str], create_seconds: float, memory: list[dict],
              adds: list[dict], merged: dict) -> dict:
    # Growth per adapter from the first step on: from version 2 the adapter table has two
    # loaded versions (its policy), which in the local stack is one more Python backend
    # process, a fixed cost the version-1 figure does not include.
    first = memory[1]
    for row in memory[2:]:
        row["mb_per_adapter"] = round((row["triton_rss_mb"] - first["triton_rss_mb"]) /
                                      (row["adapters"] - first["adapters"]), 3)
    merged_mb = merged["triton_rss_mb_after"] - merged["triton_rss_mb_before"]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": f"{platform.machine()}, "
        f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB", "model": args.model,
        "command": " ".join(sys.argv), "create": {"command": " ".join(create), "seconds": round(create_seconds, 1)},
        "memory": memory, "merged_copy": {**merged, "mb": round(merged_mb, 1)},
        "add_time": {"runs": adds, "median_seconds": statistics.median(r["seconds_to_first_answer"] for r in adds)},
    }


def markdown(record: dict) -> str:
    lines = [f"# Adapter bank benchmark ({record['model']}, {record['date']})", "", f"`{record['command']}`", "",
             f"Machine: {record['machine']}. Bank created in {record['create']['seconds']} s.", "",
             "| adapters | version | added | `bank add` s | Triton processes | Triton RSS MB | MB per adapter "
             f"since {record['memory'][1]['adapters']} | K merged copies MB |",
             "|---|---|---|---|---|---|---|---|"]
    merged = record["merged_copy"]["mb"]
    for row in record["memory"]:
        lines.append(f"| {row['adapters']} | {row['version']} | {row.get('added', '')} | {row.get('add_seconds', '')} "
                     f"| {row['processes']} | {row['triton_rss_mb']} | {row.get('mb_per_adapter', '')} | "
                     f"{round(merged * row['adapters'], 1) if row['adapters'] else ''} |")
    lines += ["", f"One merged classifier of the same base: {merged} MB of Triton RSS.", "",
              "| single add | seconds from `bank add` start to the first answer |", "|---|---|"]
    lines += [f"| {r['adapter']} (version {r['version']}, load average {r['load_average']:.1f}) | "
              f"{r['seconds_to_first_answer']} |" for r in record["add_time"]["runs"]]
    lines += ["", f"Median: {record['add_time']['median_seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
