"""Adapter banks vs PEFT mixed batches: the same base, adapters and traffic, side by side.

    .venv/bin/pip install -e '.[bench]'   # peft and transformers, for this benchmark only
    .venv/bin/python benchmarks/peft_compare.py --work /tmp/peft-compare \\
        --output docs/benchmark-runs/banks-peft/DATE

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
   base's; a mixed batch agrees too, row for row with each adapter alone.
4. Timing, interleaved (bank, PEFT, PEFT, bank, ...: each pair in alternating order, so
   drift and the machine's other load fall on both): batches of 1, 8 and 32 images naming
   the adapters in turn (batch 8: all 8 distinct). The bank gets uint8 images (its
   preprocessing is in the graph); PEFT gets the pixel values already normalised, which
   favours PEFT. torch and ONNX Runtime both use every core.

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


def check_towers(base: BaseModel, hf: torch.nn.Module, images: np.ndarray) -> dict:
    """open_clip's and Hugging Face's image towers give the same unit embeddings."""
    pixels = normalised_pixels(base, images)
    with torch.inference_mode():
        ours = F.normalize(base.model.encode_image(pixels), dim=-1)
        out = hf.get_image_features(pixel_values=pixels)
    theirs = F.normalize(getattr(out, "pooler_output", out), dim=-1)
    check = {"max_abs_diff": float((ours - theirs).abs().max()),
             "between_images": float((ours[0] - ours[1]).abs().max())}
    if not check["max_abs_diff"] <= TOLERANCE < check["between_images"]:
        raise SystemExit(f"open_clip and Hugging Face image towers disagree: {check}")
    return check


def check_fidelity(base: BaseModel, model: PeftModel, bank: PublishedBank, images: np.ndarray) -> dict:
    """Every adapter: PEFT = bank (ONNX Runtime) and != base; a mixed batch = each adapter alone."""
    ids = list(model.peft_config)
    pixels = normalised_pixels(base, images)
    base_slot = np.zeros((len(images), 1), dtype=np.int32)
    base_out = bank_embeddings(bank, images, base_slot)
    with torch.inference_mode():
        reference = F.normalize(base.model.encode_image(pixels), dim=-1).numpy()
    rows, alone = {}, []
    for adapter_id in ids:
        ours = peft_embeddings(model, pixels, [adapter_id] * len(images)).numpy()
        theirs = bank.image_embeddings(images, bank.adapter(adapter_id))
        alone.append(ours)
        rows[adapter_id] = {"peft_vs_bank": float(np.abs(ours - theirs).max()),
                            "adapter_vs_base": float(np.abs(ours - base_out).max())}
    mixed = _mixed_check(model, bank, images, pixels, ids, alone)
    result = {"tolerance": TOLERANCE, "bank_base_vs_open_clip": float(np.abs(base_out - reference).max()),
              "adapters": rows, "mixed_batch": mixed}
    worst = max(r["peft_vs_bank"] for r in rows.values())
    weakest = min(r["adapter_vs_base"] for r in rows.values())
    if not max(worst, mixed["peft_vs_bank"], mixed["peft_vs_alone"], result["bank_base_vs_open_clip"]) \
            <= TOLERANCE < weakest:
        raise SystemExit(f"PEFT and the bank disagree (or an adapter changes nothing): {result}")
    return result


def _mixed_check(model: PeftModel, bank: PublishedBank, images: np.ndarray, pixels: torch.Tensor,
                 ids: list[str], alone: list[np.ndarray]) -> dict:
    """Row n through adapter n % K: PEFT vs the bank, and PEFT vs that adapter's batch alone."""
    names = [ids[n % len(ids)] for n in range(len(images))]
    slots = np.array([[bank.adapter(i).slot] for i in names], dtype=np.int32)
    ours = peft_embeddings(model, pixels, names).numpy()
    expected = np.stack([alone[n % len(ids)][n] for n in range(len(images))])
    return {"adapters": names, "peft_vs_bank": float(np.abs(ours - bank_embeddings(bank, images, slots)).max()),
            "peft_vs_alone": float(np.abs(ours - expected).max())}


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def one_pair(bank: PublishedBank, model: PeftModel, bank_inputs: tuple[np.ndarray, np.ndarray],
             peft_inputs: tuple[torch.Tensor, list[str]], bank_first: bool) -> dict[str, float]:
    """Seconds of one bank call and one PEFT call on the same batch, in the order given."""
    calls = [("bank", lambda: bank_embeddings(bank, *bank_inputs)), ("peft", lambda: peft_embeddings(model, *peft_inputs))]
    return {name: timed(call) for name, call in (calls if bank_first else calls[::-1])}


def time_batch(base: BaseModel, model: PeftModel, bank: PublishedBank, batch: int, budget: float,
               args: argparse.Namespace) -> dict:
    """Interleaved pairs (order alternating) of one bank and one PEFT call on the same traffic."""
    ids = list(model.peft_config)
    rng = np.random.default_rng(batch)
    images = rng.integers(0, 256, (batch, bank.image_size, bank.image_size, 3), dtype=np.uint8)
    pixels = normalised_pixels(base, images)
    bank_s, peft_s, started, pair = [], [], time.perf_counter(), -1
    while True:
        pair += 1
        names = [ids[(pair + n) % len(ids)] for n in range(batch)]
        slots = np.array([[bank.adapter(i).slot] for i in names], dtype=np.int32)
        times = one_pair(bank, model, (images, slots), (pixels, names), bank_first=pair % 2 == 0)
        if pair >= args.warmup:  # the first pairs warm both up (allocations, kernels, caches)
            bank_s.append(times["bank"])
            peft_s.append(times["peft"])
        elapsed = time.perf_counter() - started
        if len(bank_s) >= args.max_pairs or (len(bank_s) >= args.min_pairs and elapsed > budget):
            break
    print(f"batch {batch}: {len(bank_s)} pairs, bank p50 {np.median(bank_s):.3f} s, PEFT p50 "
          f"{np.median(peft_s):.3f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    return {"batch": batch, "distinct_adapters": min(batch, len(ids)), "bank_seconds": bank_s,
            "peft_seconds": peft_s, "load_average_after": os.getloadavg()[0]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name or JSON config (default ViT-B-16)")
    parser.add_argument("--work", type=Path, required=True, help="a new scratch folder (adapters, bank repository)")
    parser.add_argument("--output", type=Path, required=True, help="where peft_compare.json and .md go")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters (default 8)")
    parser.add_argument("--rank", type=int, default=2, help="LoRA rank of every adapter (default 2)")
    parser.add_argument("--budget", default="8:240,1:45,32:150",
                        help="BATCH:SECONDS of timed pairs per batch size, in order (default 8:240,1:45,32:150)")
    parser.add_argument("--min-pairs", type=int, default=3, help="timed pairs at least, whatever the budget")
    parser.add_argument("--max-pairs", type=int, default=200, help="timed pairs at most")
    parser.add_argument("--warmup", type=int, default=1, help="untimed pairs first (default 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ONNX Runtime threads")
    args = parser.parse_args()
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
    probes = np.random.default_rng(0).integers(0, 256, (8, bank.image_size, bank.image_size, 3), dtype=np.uint8)
    hf = to_hf_clip(base.model)
    towers = check_towers(base, hf, probes[:2])  # before PEFT puts its layers in
    model = peft_model(hf, folders)
    fidelity = check_fidelity(base, model, bank, probes)
    print(json.dumps({"towers": towers, "fidelity": fidelity}, indent=1), flush=True)
    runs = [time_batch(base, model, bank, batch, budget, args) for batch, budget in args.budget]
    record = summarize(args, commands, environment(args.threads, load_before), towers, fidelity, runs)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "peft_compare.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.output / "peft_compare.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
