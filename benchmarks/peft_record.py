"""The record of benchmarks/peft_compare.py: the machine, the figures with their intervals, Markdown."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import UTC, datetime
from importlib.metadata import version

import numpy as np
import psutil
import torch

BOOTSTRAP = 2000  # resamples of the timed pairs for the ratio's interval
SHARED_NOTE = ("The machine was shared with other engineers' test runs while this ran (load averages "
               "before, during and after below): absolute figures are low and noisy; the bank/PEFT ratio "
               "comes from interleaved pairs, so the load falls on both sides.")
FAVOUR_NOTE = ("The bank gets uint8 images and preprocesses them in its graph; PEFT gets pixel values "
               "already scaled and normalised, outside the timing: this favours PEFT.")


def environment(threads: int, load_before: tuple[float, float, float]) -> dict:
    """Versions, machine and threads, and the load average when the run began."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {
        "versions": {p: version(p) for p in ("torch", "transformers", "peft", "onnxruntime", "open_clip_torch")},
        "python": sys.version.split()[0],
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30)},
        "threads": {"torch": torch.get_num_threads(), "onnxruntime_intra_op": threads},
        "load_average_before": list(load_before),
    }


def ratio_interval(numerator: np.ndarray, denominator: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of sum(numerator)/sum(denominator) over resampled rounds."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(numerator), (BOOTSTRAP, len(numerator)))
    ratios = numerator[picks].sum(axis=1) / denominator[picks].sum(axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def ratio(seconds: dict[str, np.ndarray], slower: str, faster: str) -> dict:
    """How many times `faster`'s throughput is `slower`'s, with its interval and the median round's."""
    low, high = ratio_interval(seconds[slower], seconds[faster])
    return {"ratio": round(float(seconds[slower].sum() / seconds[faster].sum()), 3),
            "interval_95": [round(low, 3), round(high, 3)],
            "round_median": round(float(np.median(seconds[slower] / seconds[faster])), 3)}


def batch_figures(run: dict) -> dict:
    """Throughput and latency percentiles of each side; bank vs PEFT, bank vs eager, eager vs PEFT."""
    seconds, batch = {k: np.array(v) for k, v in run["seconds"].items()}, run["batch"]
    sides = {name: {"images_per_second": round(batch * len(t) / t.sum(), 2),
                    "p50_batch_seconds": round(float(np.median(t)), 4),
                    "p90_batch_seconds": round(float(np.percentile(t, 90)), 4)} for name, t in seconds.items()}
    return {**run, **sides, "rounds": len(seconds["bank"]),
            "bank_over_peft": ratio(seconds, "peft", "bank"), "bank_over_eager": ratio(seconds, "eager", "bank"),
            "eager_over_peft": ratio(seconds, "peft", "eager")}


def summarize(args: argparse.Namespace, commands: list[dict], env: dict, towers: dict, fidelity: dict,
              runs: list[dict]) -> dict:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "model": args.model, "weights": "random (open_clip, seed 0), the same in both",
        "adapters": {"count": args.adapters, "rank": args.rank, "lora_alpha": 2.0 * args.rank,
                     "matrices": "q,k,v of every vision block", "format": "PEFT folders"},
        "bank_commands": commands, **env, "load_average_after": list(os.getloadavg()),
        "notes": [SHARED_NOTE, FAVOUR_NOTE,
                  "PEFT path: CLIPModel.get_image_features inside PeftModel._enable_peft_forward_hooks("
                  "adapter_names=...), as PeftModel.forward routes mixed batches (get_image_features(..., "
                  "adapter_names=...) on the PeftModel ignores the names); eager, torch.inference_mode.",
                  "Bank path: the published bank's ONNX Runtime session in this process (no Triton, no gateway).",
                  "eager: the same Hugging Face CLIPModel without PEFT or adapters (get_image_features, "
                  "torch.inference_mode): eager PyTorch's own cost, for scale; not something that serves adapters."],
        "tower_check": towers, "fidelity": fidelity, "batches": [batch_figures(r) for r in runs],
    }


def markdown(record: dict) -> str:
    env = record["machine"]
    lines = [f"# Adapter bank vs PEFT mixed batches ({record['model']}, {record['date']})", "",
             f"`{record['command']}`", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; threads {record['threads']}. "
             f"Versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}.", "",
             f"Load average (1, 5, 15 min) before: {_load(record['load_average_before'])}; after: "
             f"{_load(record['load_average_after'])}. {SHARED_NOTE}", "", FAVOUR_NOTE, "",
             f"Adapters: {record['adapters']['count']} PEFT folders, rank {record['adapters']['rank']}, "
             f"{record['adapters']['matrices']}. Fidelity (max |Δ| of unit image embeddings): open_clip vs Hugging "
             f"Face {record['tower_check']['max_abs_diff']:.1e}; PEFT vs bank, worst adapter "
             f"{max(r['peft_vs_bank'] for r in record['fidelity']['adapters'].values()):.1e}, mixed batch "
             f"{record['fidelity']['mixed_batch']['peft_vs_bank']:.1e}; smallest adapter effect vs the base "
             f"{min(r['adapter_vs_base'] for r in record['fidelity']['adapters'].values()):.1e}.", "",
             "| batch | distinct adapters | rounds | bank images/s | PEFT images/s | eager (no adapters) images/s "
             "| bank / PEFT throughput (95% bootstrap) | bank / eager | eager / PEFT | p50 s/batch bank, PEFT, eager "
             "| load average after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in record["batches"]:
        lines.append(f"| {b['batch']} | {b['distinct_adapters']} | {b['rounds']} | {b['bank']['images_per_second']} "
                     f"| {b['peft']['images_per_second']} | {b['eager']['images_per_second']} "
                     f"| {_ratio(b['bank_over_peft'])} | {_ratio(b['bank_over_eager'])} "
                     f"| {_ratio(b['eager_over_peft'])} | {b['bank']['p50_batch_seconds']}, "
                     f"{b['peft']['p50_batch_seconds']}, {b['eager']['p50_batch_seconds']} "
                     f"| {b['load_average_after']:.1f} |")
    lines += ["", *(f"- {note}" for note in record["notes"][2:]), ""]
    return "\n".join(lines)


def _load(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _ratio(figure: dict) -> str:
    return f"{figure['ratio']}× ({figure['interval_95'][0]}–{figure['interval_95'][1]})"
