"""Helpers for adapter-bank tests: adapters of every layout, sessions on published versions,
and what the tests compare against (computed here with the model library's merge, not the
bank's code)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from cliplora.core import contract
from cliplora.model.adapters import load_adapter
from cliplora.model.merge import merge_adapter
from tests import factories

CLASSES = ["cat", "dog", "red_panda", "golden_retriever"]

# (id, writer kwargs): the paper's layouts (encoder, position, params, rank) and PEFT's.
PAPER_LAYOUTS = {
    "vis-all-qkvo-r1": dict(encoder="vision", position="all", params=("q", "k", "v", "o"), r=1),
    "txt-top2-qv": dict(encoder="text", position="top2", params=("q", "v"), r=2),
    "both-halfup-ko-r16": dict(encoder="both", position="half-up", params=("k", "o"), r=16),
    "vis-bottom-q-r3": dict(encoder="vision", position="bottom", params=("q",), r=3),
    "vis-mid-v-r5": dict(encoder="vision", position="mid", params=("v",), r=5),
    "vis-up-k-r8": dict(encoder="vision", position="up", params=("k",), r=8),
    "vis-top-o": dict(encoder="vision", position="top", params=("o",), r=2),
    "both-top3-qkv-r4": dict(encoder="both", position="top3", params=("q", "k", "v"), r=4),
    "txt-halfbottom-qkvo": dict(encoder="text", position="half-bottom", params=("q", "k", "v", "o"), r=2),
    "txt-top1-k-r12": dict(encoder="text", position="top1", params=("k",), r=12),
    "vis-halfbottom-qkv-r2": dict(encoder="vision", position="half-bottom", params=("q", "k", "v"), r=2),
    "both-top2-v": dict(encoder="both", position="top2", params=("v",), r=2),
}


def write_paper(folder: Path, adapter_id: str, seed: int) -> Path:
    return factories.write_paper_checkpoint(folder / f"{adapter_id}.pt", seed=seed, **PAPER_LAYOUTS[adapter_id])


def write_peft(folder: Path) -> Path:
    """A PEFT adapter with per-module ranks (rank_pattern) and rsLoRA: ranks 2 and 6 in one adapter."""
    return factories.write_peft_adapter(
        folder / "peft", modules=(("vision", 0, "q"), ("vision", 5, "v"), ("vision", 7, "o"), ("text", 3, "k")),
        r=2, alpha=4.0, use_rslora=True, rank_pattern={"vision_model.encoder.layers.5.self_attn.v_proj": 6})


def write_finetune_output(path: Path, tiny_config: Path) -> Path:
    """What `cliplora finetune` saves (finetune's own checkpoint writer), with trained-looking B."""
    from cliplora.finetune.lora_layers import apply_lora, paper_checkpoint
    from cliplora.finetune.options import LoraSpec
    from cliplora.model.base_model import load_base_model

    model = load_base_model(str(tiny_config), None, allow_random_weights=True).model
    spec = LoraSpec(encoder="both", position="all", params=("q", "k", "v"), r=2)
    adapted = apply_lora(model, spec)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in adapted:
            for branch in block.attention.branches.values():
                branch.w_lora_B.copy_(torch.randn(branch.w_lora_B.shape, generator=generator) * 0.2)
    torch.save(paper_checkpoint(adapted, spec), path)
    return path


def write_adapters_file(path: Path, entries: Sequence[tuple[str, Path, Path]]) -> Path:
    """An --adapters-file: (id, lora, classes) each, paths relative to the file."""
    path.write_text(json.dumps([{"adapter": a, "lora": str(lora.relative_to(path.parent)),
                                 "classes": str(classes.relative_to(path.parent)), "template": ["a photo of a {}."]}
                                for a, lora, classes in entries]))
    return path


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path / contract.MODEL_FILENAME), providers=["CPUExecutionProvider"])


def images(count: int, size: int = factories.IMAGE_SIZE, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def bank_embeds(bank: ort.InferenceSession, crops: np.ndarray, slots: Sequence[int]) -> np.ndarray:
    return bank.run([contract.BANK_OUTPUT_NAME], {
        contract.INPUT_NAME: crops,
        contract.BANK_ADAPTER_NAME: np.asarray(slots, dtype=np.int32).reshape(-1, 1)})[0]


def table_entry(companion: ort.InferenceSession, slot: int) -> dict[str, np.ndarray]:
    names = [contract.CLASS_EMBEDS_NAME, contract.CLASS_COUNT_NAME, contract.CLASS_NAMES_NAME,
             contract.ADAPTER_TABLE_NAME]
    values = companion.run(names, {contract.BANK_ADAPTER_NAME: np.array([slot], dtype=np.int32)})
    return dict(zip(names, values, strict=True))


@torch.no_grad()
def merged_embeds(base, lora: str | Path | None, crops: np.ndarray) -> np.ndarray:
    """Unit image embeddings of the adapter merged into the base model (the model library's merge)."""
    model = base.model
    if lora is not None:
        model = merge_adapter(base.model, load_adapter(str(lora), len(base.text_blocks), len(base.vision_blocks)))[0]
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(base.mean).view(1, 3, 1, 1)) / torch.tensor(base.std).view(1, 3, 1, 1)
    return F.normalize(model.encode_image(x), dim=-1).numpy()


def published_snapshot(root: Path) -> dict[str, bytes | None]:
    """The repository's models, file by file (lock files aside: taking a lock is not publishing)."""
    return {k: v for k, v in factories.tree_snapshot(root).items() if not Path(k).name.startswith(".cliplora-")}
