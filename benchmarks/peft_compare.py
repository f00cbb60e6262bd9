"""Adapter banks vs PEFT mixed batches: the same base, adapters and traffic, side by side.

    .venv/bin/pip install -e '.[bench]'   # peft and transformers, for this benchmark only
    .venv/bin/python benchmarks/peft_compare.py --work /tmp/peft-compare --output OUT
    .venv/bin/python benchmarks/peft_compare.py --work /tmp/peft-compare-t1 --output OUT --threads 1

(the records quoted in docs/benchmarks.md are under docs/benchmark-runs/banks-peft/).

What a user would write instead of a bank: a Hugging Face `CLIPModel` holding every adapter
through PEFT, each batch naming one adapter per sample (PEFT's mixed-batch inference, eager
PyTorch). Steps (docs/benchmarks.md, "Adapter banks vs PEFT mixed batches"):

1. The base: open_clip's `--model` with random weights (`load_base_model`, seed 0, the same
   weights `cliplora bank create --allow-random-weights` builds), copied into a Hugging Face
   `CLIPModel` (benchmarks/hf_clip.py); both image towers must agree within 1e-4.
2. `--adapters` distinct rank-`--rank` q/k/v LoRA adapters on every vision block, written
   as PEFT folders (``adapter_config.json`` + ``adapter_model.safetensors``); PEFT loads
   them (`PeftModel.from_pretrained`, `load_adapter`), and `cliplora bank create` +
   `cliplora bank add --adapters-file` put the same folders in a bank.
3. Fidelity: for every adapter, PEFT's image embedding and the bank's (ONNX Runtime in
   this process, `PublishedBank.image_embeddings`) agree within 1e-4, and differ from the
   base's; a mixed batch (one image per adapter) agrees too, row for row with each
   adapter alone.
4. Timing, interleaved in rounds (bank, PEFT, eager; then PEFT, eager, bank; ...: the
   order rotates, so drift and the machine's other load fall on all three): batches of 8,
   1 and 32 images naming the adapters in turn (batch 8: all 8 distinct). The bank gets
   uint8 images (its preprocessing is in the graph); PEFT gets the pixel values already
   normalised, which favours PEFT. "eager" is the same Hugging Face CLIP without PEFT or
   adapters: what eager PyTorch costs alone, so the bank's lead splits into ONNX Runtime
   vs eager and PEFT's own cost. torch and ONNX Runtime use --threads threads each (default:
   every core; 1 each takes the synchronisation of thread teams out of the comparison).

PEFT's mixed batches: `get_image_features(pixel_values, adapter_names=...)` on the
`PeftModel` silently ignores `adapter_names` (the call goes past PEFT to `CLIPModel`,
which drops unknown keyword arguments: every row gets the active adapter), so the
adapters are routed as `PeftModel.forward` routes them, inside PEFT's
`_enable_peft_forward_hooks(adapter_names=...)`; step 3 checks each row got its adapter.

Writes ``peft_compare.json`` (every figure, command and version) and ``peft_compare.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the base is built here

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hf_clip import to_hf_clip  # noqa: E402
from peft import PeftModel  # noqa: E402
from peft_record import environment, markdown, summarize  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from cliplora.core import contract  # noqa: E402
from cliplora.core.bank_runtime import PublishedBank, open_bank  # noqa: E402
from cliplora.model.base_model import BaseModel, load_base_model  # noqa: E402

BANK = "peftcmp"
CLI = str(Path(sys.executable).with_name("cliplora"))
TOLERANCE = 1e-4  # on unit image embeddings
PEFT_TARGETS = r".*vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"


def write_peft_adapter(folder: Path, seed: int, blocks: int, width: int, rank: int, alpha: float) -> Path:
    """A PEFT LoRA folder for Hugging Face CLIP: q/k/v of every vision block, random factors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(blocks):
        for proj in ("q_proj", "k_proj", "v_proj"):
            prefix = f"base_model.model.vision_model.encoder.layers.{block}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, width, generator=generator) / width ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, rank, generator=generator) * 0.05
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": PEFT_TARGETS,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
              "task_type": None, "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def peft_model(hf: torch.nn.Module, folders: dict[str, Path]) -> PeftModel:
    """`hf` with every adapter loaded into PEFT (in place), in eval mode."""
    (first, folder), *rest = folders.items()
    model = PeftModel.from_pretrained(hf, str(folder), adapter_name=first)
    for adapter_id, path in rest:
        model.load_adapter(str(path), adapter_name=adapter_id)
    return model.eval()


def peft_embeddings(model: PeftModel, pixels: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Unit image embeddings, row n through adapter names[n] (PEFT's mixed-batch routing)."""
    with torch.inference_mode(), model._enable_peft_forward_hooks(adapter_names=names):
        out = model.get_image_features(pixel_values=pixels)
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def bank_embeddings(bank: PublishedBank, images: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Unit image embeddings from the bank's ONNX Runtime session, row n through slots[n]."""
    return bank.session.run([contract.EMBEDS_NAME], {contract.INPUT_NAME: images,
                                                     contract.BANK_ADAPTER_NAME: slots})[0]


def normalised_pixels(base: BaseModel, images: np.ndarray) -> torch.Tensor:
    """What CLIP's preprocessing gives for already-square uint8 images: [N, 3, S, S] fp32."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(base.mean).view(1, 3, 1, 1)) / torch.tensor(base.std).view(1, 3, 1, 1)


def run(command: list[str]) -> dict:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return {"command": " ".join(command), "seconds": round(time.perf_counter() - started, 1)}


def build_bank(args: argparse.Namespace, folders: dict[str, Path]) -> list[dict]:
    """`cliplora bank create` and one `cliplora bank add` of every adapter folder."""
    repo, classes = args.work / "repo", args.work / "classes.txt"
    classes.write_text("".join(f"class_{i}\n" for i in range(10)))
    entries = [{"adapter": i, "lora": str(f), "classes": str(classes)} for i, f in folders.items()]
    (args.work / "adapters.json").write_text(json.dumps(entries))
    common = ["--repository", str(repo), "--quiet"]
    return [run([CLI, "bank", "create", BANK, "--model", args.model, "--allow-random-weights", "--classes",
                 str(classes), "--max-rank", str(args.rank), "--matrices", "q,k,v", *common]),
            run([CLI, "bank", "add", BANK, "--adapters-file", str(args.work / "adapters.json"), *common])]


def hf_embeddings(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Unit image embeddings of a plain Hugging Face `CLIPModel` (no adapters)."""
    with torch.inference_mode():
        out = model.get_image_features(pixel_values=pixels)
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def check_towers(base: BaseModel, hf: torch.nn.Module, images: np.ndarray) -> dict:
    """open_clip's and Hugging Face's image towers give the same unit embeddings."""
    pixels = normalised_pixels(base, images)
    with torch.inference_mode():
        ours = F.normalize(base.model.encode_image(pixels), dim=-1)
    theirs = hf_embeddings(hf, pixels)
    check = {"max_abs_diff": float((ours - theirs).abs().max()),
             "between_images": float((ours[0] - ours[1]).abs().max())}
    if not check["max_abs_diff"] <= TOLERANCE < check["between_images"]:
        raise SystemExit(f"open_clip and Hugging Face image towers disagree: {check}")
    return check


def check_fidelity(base: BaseModel, model: PeftModel, bank: PublishedBank, images: np.ndarray) -> dict:
    """Adapter k on images k and k+1: PEFT = bank (ONNX Runtime) and != base; then a mixed
    batch, image k through adapter k, = each adapter alone. `images`: one per adapter."""
    ids = list(model.peft_config)
    base_out = bank_embeddings(bank, images, np.zeros((len(images), 1), dtype=np.int32))
    with torch.inference_mode():
        reference = F.normalize(base.model.encode_image(normalised_pixels(base, images)), dim=-1).numpy()
    rows, alone = {}, []
    for k, adapter_id in enumerate(ids):
        probe = [k, (k + 1) % len(ids)]
        ours = peft_embeddings(model, normalised_pixels(base, images[probe]), [adapter_id] * 2).numpy()
        theirs = bank.image_embeddings(images[probe], bank.adapter(adapter_id))
        alone.append(ours[0])
        rows[adapter_id] = {"peft_vs_bank": float(np.abs(ours - theirs).max()),
                            "adapter_vs_base": float(np.abs(ours - base_out[probe]).max())}
    mixed = _mixed_check(model, bank, images, normalised_pixels(base, images), ids, np.stack(alone))
    result = {"tolerance": TOLERANCE, "bank_base_vs_open_clip": float(np.abs(base_out - reference).max()),
              "adapters": rows, "mixed_batch": mixed}
    worst = max(r["peft_vs_bank"] for r in rows.values())
    weakest = min(r["adapter_vs_base"] for r in rows.values())
    if not max(worst, mixed["peft_vs_bank"], mixed["peft_vs_alone"], result["bank_base_vs_open_clip"]) \
            <= TOLERANCE < weakest:
        raise SystemExit(f"PEFT and the bank disagree (or an adapter changes nothing): {result}")
    return result


def _mixed_check(model: PeftModel, bank: PublishedBank, images: np.ndarray, pixels: torch.Tensor,
                 ids: list[str], alone: np.ndarray) -> dict:
    """Row k through adapter k: PEFT vs the bank, and PEFT vs adapter k's batch alone."""
    slots = np.array([[bank.adapter(i).slot] for i in ids], dtype=np.int32)
    ours = peft_embeddings(model, pixels, ids).numpy()
    return {"adapters": ids, "peft_vs_bank": float(np.abs(ours - bank_embeddings(bank, images, slots)).max()),
            "peft_vs_alone": float(np.abs(ours - alone).max())}


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def one_round(calls: dict[str, Callable[[], object]], first: int) -> dict[str, float]:
    """Seconds of each call on the same batch, starting from the `first`-th (the order rotates)."""
    names = list(calls)
    order = names[first % len(names):] + names[:first % len(names)]
    return {name: timed(calls[name]) for name in order}


def time_batch(base: BaseModel, models: tuple[PeftModel, torch.nn.Module], bank: PublishedBank, batch: int,
               budget: float, args: argparse.Namespace) -> dict:
    """Rounds of one bank, one PEFT and one plain Hugging Face call on the same traffic, in
    rotating order, until `budget` seconds and --min-rounds rounds are done."""
    model, plain = models
    ids = list(model.peft_config)
    images = np.random.default_rng(batch).integers(0, 256, (batch, bank.image_size, bank.image_size, 3), np.uint8)
    pixels = normalised_pixels(base, images)
    seconds: dict[str, list[float]] = {"bank": [], "peft": [], "eager": []}
    started, round_ = time.perf_counter(), -1
    while True:
        round_ += 1
        names = [ids[(round_ + n) % len(ids)] for n in range(batch)]
        slots = np.array([[bank.adapter(i).slot] for i in names], dtype=np.int32)
        times = one_round({"bank": partial(bank_embeddings, bank, images, slots),
                           "peft": partial(peft_embeddings, model, pixels, names),
                           "eager": partial(hf_embeddings, plain, pixels)}, round_)
        if round_ >= args.warmup:  # the first rounds warm everything up (allocations, kernels, caches)
            for name, value in times.items():
                seconds[name].append(value)
        done = len(seconds["bank"])
        if done >= args.max_rounds or (done >= args.min_rounds and time.perf_counter() - started > budget):
            break
    print(f"batch {batch}: {done} rounds, p50 " + ", ".join(f"{k} {np.median(v):.3f} s" for k, v in seconds.items())
          + f", load average {os.getloadavg()[0]:.1f}", flush=True)
    return {"batch": batch, "distinct_adapters": min(batch, len(ids)), "seconds": seconds,
            "load_average_after": os.getloadavg()[0]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name or JSON config (default ViT-B-16)")
    parser.add_argument("--work", type=Path, required=True, help="a new scratch folder (adapters, bank repository)")
    parser.add_argument("--output", type=Path, required=True, help="where peft_compare.json and .md go")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters (default 8)")
    parser.add_argument("--rank", type=int, default=2, help="LoRA rank of every adapter (default 2)")
    parser.add_argument("--budget", default="8:240,1:45,32:60",
                        help="BATCH:SECONDS of timed rounds per batch size, in order (default 8:240,1:45,32:60)")
    parser.add_argument("--min-rounds", type=int, default=3, help="timed rounds at least, whatever the budget")
    parser.add_argument("--max-rounds", type=int, default=200, help="timed rounds at most")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ONNX Runtime threads")
    args = parser.parse_args()
    if args.adapters < 2:
        parser.error("--adapters: at least 2, for a mixed batch")
    args.budget = [(int(b), float(s)) for b, s in (item.split(":") for item in args.budget.split(","))]
    return args


def main() -> int:
    args = parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=False)
    base = load_base_model(args.model, None, allow_random_weights=True)
    blocks, width = len(base.vision_blocks), base.model.visual.conv1.weight.shape[0]
    folders = {f"a{i}": write_peft_adapter(args.work / f"a{i}", 100 + i, blocks, width, args.rank, 2.0 * args.rank)
               for i in range(args.adapters)}
    commands = build_bank(args, folders)
    bank = open_bank(args.work / "repo", BANK, threads=args.threads)
    probes = np.random.default_rng(0).integers(0, 256, (args.adapters, bank.image_size, bank.image_size, 3),
                                               dtype=np.uint8)
    plain = to_hf_clip(base.model)  # stays without adapters: eager PyTorch alone, for scale
    towers = check_towers(base, plain, probes[:2])
    model = peft_model(to_hf_clip(base.model), folders)
    fidelity = check_fidelity(base, model, bank, probes)
    print(json.dumps({"towers": towers, "fidelity": fidelity}, indent=1), flush=True)
    runs = [time_batch(base, (model, plain), bank, batch, budget, args) for batch, budget in args.budget]
    record = summarize(args, commands, environment(args.threads, load_before), towers, fidelity, runs)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "peft_compare.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.output / "peft_compare.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
