"""GPU check for the device tool: merged vs base vs unmerged ViT-B-16 image tower on CUDA.

Prepared for a session that is lent a GPU (`device` tool); NOT RUN in the session that
wrote it (no device was drawn). The device image has torch but neither open_clip nor
onnxruntime-gpu, so carry wheels (see run_on_device.sh) and measure the claim itself in
PyTorch: with the adapter merged, the graph and its cost are the base model's.

Prints JSON: per model and batch size, median and p90 milliseconds over interleaved
rounds (CUDA events), fp16 and fp32, and the max |Δ| between merged and unmerged outputs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cliplora.model.adapters import load_adapter  # noqa: E402
from cliplora.model.base_model import load_base_model  # noqa: E402
from cliplora.model.demo import synthetic_adapter  # noqa: E402
from cliplora.model.merge import merge_adapter  # noqa: E402
from cliplora.model.reference import build_reference  # noqa: E402


def timed(model: torch.nn.Module, batch: torch.Tensor, rounds: int) -> list[float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(rounds):
        start.record()
        model.encode_image(batch)
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


@torch.inference_mode()
def main() -> None:
    work = Path("/tmp/cliplora-gpu")
    work.mkdir(exist_ok=True)
    base = load_base_model("ViT-B-16", None, allow_random_weights=True)
    adapter = load_adapter(str(synthetic_adapter("ViT-B-16", work / "lora.pt")), 12, 12)
    models = {"base": base.model, "merged": merge_adapter(base.model, adapter)[0],
              "unmerged": build_reference(base.model, adapter)}
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    for dtype in (torch.float16, torch.float32):
        placed = {name: m.to("cuda", dtype).eval() for name, m in models.items()}
        for batch_size in (1, 32):
            batch = torch.randn(batch_size, 3, 224, 224, device="cuda", dtype=dtype)
            for model in placed.values():
                timed(model, batch, 10)  # warm-up
            samples: dict[str, list[float]] = {name: [] for name in placed}
            for _ in range(20):  # interleaved: base, merged, unmerged, base, ...
                for name, model in placed.items():
                    samples[name] += timed(model, batch, 5)
            key = f"{str(dtype).removeprefix('torch.')}/batch{batch_size}"
            report["runs"][key] = {name: {"median_ms": statistics.median(v), "p90_ms": sorted(v)[int(0.9 * len(v))]}
                                   for name, v in samples.items()}
            merged_out = placed["merged"].encode_image(batch).float()
            unmerged_out = placed["unmerged"].encode_image(batch).float()
            report["runs"][key]["max_abs_diff_merged_unmerged"] = float((merged_out - unmerged_out).abs().max())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
