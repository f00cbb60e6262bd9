"""Adapter banks: Triton's resident memory before and after every adapter of a bank is used.

    .venv/bin/python benchmarks/bank_touch.py --repository /tmp/bank-bench/repo --output OUT

A bank's factor stacks are ONNX external data; a slot's factors become resident when a
request first uses it. `benchmarks/bank_bench.py` asks for a few slots only, so its figure
is the cost of adapters that exist; this one starts the local Triton on a bank repository
that script left (`--work`/repo), measures the RSS of tritonserver and its backend processes
after requests for the base only, then after one request for every slot of the latest
version: the cost of adapters that are used. Writes ``bank_touch.json`` into `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import tritonclient.grpc as grpcclient

from cliplora.serve.stack.triton_launcher import LocalTriton, TritonPorts

sys.path.insert(0, str(Path(__file__).parent))
from bank_bench import BANK, infer, triton_rss_mb, until_answered  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="a repository bank_bench.py left")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.output.mkdir(parents=True, exist_ok=True)
    version = max(int(p.name) for p in (args.repository / BANK).iterdir() if p.name.isdigit())
    manifest = json.loads((args.repository / BANK / str(version) / "manifest.json").read_text())
    slots, size = manifest["files"]["slots"], manifest["settings"]["image_size"]
    with LocalTriton(args.repository, ports=TritonPorts(18100, 18101, 18102)) as triton:
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        until_answered(client, size, 0, version)
        for _ in range(3):
            infer(client, size, 0, version)
        time.sleep(2)
        base_only = triton_rss_mb(triton)
        for slot in range(slots):
            infer(client, size, slot, version)
        time.sleep(2)
        every = triton_rss_mb(triton)
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "machine": f"{psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "bank_version": version, "slots": slots, "live_adapters": len(manifest["adapters"]) - 1,
        "factors_bytes": manifest["files"]["factors_bytes"], "triton_rss_mb_base_only": round(base_only, 1),
        "triton_rss_mb_every_slot_used": round(every, 1),
        "mb_per_slot_used": round((every - base_only) / (slots - 1), 3),
    }
    (args.output / "bank_touch.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
