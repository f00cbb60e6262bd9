"""The CLIP-LoRA paper's checkpoint format (its code's ``save_lora``).

``torch.save({"weights": {"layer_{i}": {"q_proj"|"k_proj"|"v_proj"|"proj":
{"w_lora_A": [r, d], "w_lora_B": [d, r]}}}, "metadata": {"r", "alpha", "encoder",
"params", "position"}})``.

- ``layer_i`` runs over the adapted blocks in order: text blocks first, then vision
  blocks, each by increasing block index, as the paper's ``apply_lora`` lists them.
- ``encoder`` is text | vision | both; ``params`` ⊆ [q, k, v, o] (``o`` is saved as
  ``proj``, the attention output projection).
- ``position`` names the blocks; see `block_indices`.
- The scale is ``alpha / sqrt(r)`` (the paper's ``LinearLoRA``), not ``alpha / r``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cliplora.core.errors import InvalidArgument
from cliplora.core.hashing import sha256_file
from cliplora.model.checkpoint_io import load_tensors
from cliplora.model.lora import LoraAdapter, LoraUpdate, Target, Tower, to_fp32_matrix

ENCODERS = {"text": ("text",), "vision": ("vision",), "both": ("text", "vision")}
SAVED_NAME: dict[Target, str] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
POSITIONS = ("all", "bottom", "mid", "up", "half-up", "half-bottom", "top", "top1", "top2", "top3")


def block_indices(position: str, n_blocks: int) -> list[int]:
    """The blocks a ``position`` names in a tower of `n_blocks` blocks.

    For the paper's 12-block towers (ViT-B/16, ViT-B/32, and every CLIP text tower):
    all = 0..11, bottom = 0..3, mid = 4..7, up = 8..11, half-up = 6..11,
    half-bottom = 0..5, top3 = 9..11, top2 = 10..11, top1 = top = 11. ViT-L/14's
    24-block vision tower: all, half-up = 12..23, half-bottom = 0..11. The same rules
    (quarters are thirds of the tower, halves are halves) extend to any block count
    that divides evenly; otherwise the position is refused rather than guessed.
    """
    n = n_blocks
    if position == "all":
        return list(range(n))
    if position in ("half-up", "half-bottom"):
        if n % 2:
            raise InvalidArgument(f"position {position!r} needs an even block count; this tower has {n}")
        return list(range(n // 2, n)) if position == "half-up" else list(range(n // 2))
    if position in ("bottom", "mid", "up"):
        if n % 3:
            raise InvalidArgument(f"position {position!r} needs a block count divisible by 3; this tower has {n}")
        third = n // 3
        start = {"bottom": 0, "mid": third, "up": 2 * third}[position]
        return list(range(start, start + third))
    tops = {"top": 1, "top1": 1, "top2": 2, "top3": 3}
    if position in tops:
        if tops[position] > n:
            raise InvalidArgument(f"position {position!r} needs {tops[position]} blocks; this tower has {n}")
        return list(range(n - tops[position], n))
    raise InvalidArgument(f"unknown LoRA position {position!r}; known: {', '.join(POSITIONS)}")


def adapted_blocks(encoder: str, position: str, tower_sizes: Mapping[Tower, int]) -> list[tuple[Tower, int]]:
    """The (tower, block) pairs an adapter adapts, in ``layer_i`` order: the text tower's
    blocks first, then the vision tower's, each by increasing index."""
    return [(tower, i) for tower in ENCODERS[encoder] for i in block_indices(position, tower_sizes[tower])]


def _metadata(raw: Any, path: Path) -> tuple[int, float, str, list[Target], str]:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"LoRA checkpoint {path}: 'metadata' must be a dict")
    missing = [k for k in ("r", "alpha", "encoder", "params", "position") if k not in raw]
    if missing:
        raise InvalidArgument(f"LoRA checkpoint {path}: metadata lacks {missing}")
    r, alpha, encoder, params, position = (raw[k] for k in ("r", "alpha", "encoder", "params", "position"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InvalidArgument(f"LoRA checkpoint {path}: metadata r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidArgument(f"LoRA checkpoint {path}: metadata alpha must be a number, got {alpha!r}")
    if encoder not in ENCODERS:
        raise InvalidArgument(f"LoRA checkpoint {path}: metadata encoder must be text, vision or both, got {encoder!r}")
    if isinstance(params, str):
        params = list(params)  # "qkv" as well as ["q", "k", "v"]
    if not isinstance(params, (list, tuple)) or not params or any(p not in SAVED_NAME for p in params):
        raise InvalidArgument(f"LoRA checkpoint {path}: metadata params must be a subset of q, k, v, o, got {params!r}")
    if not isinstance(position, str):
        raise InvalidArgument(f"LoRA checkpoint {path}: metadata position must be a string, got {position!r}")
    ordered = [t for t in SAVED_NAME if t in params]
    return r, float(alpha), encoder, ordered, position


def load_clip_lora_checkpoint(path: Path, *, text_blocks: int, vision_blocks: int) -> LoraAdapter:
    """Read a paper-format checkpoint and check it against its own metadata and the model."""
    raw = load_tensors(path, "LoRA checkpoint")
    if not isinstance(raw, dict) or "weights" not in raw or "metadata" not in raw:
        keys = sorted(raw)[:5] if isinstance(raw, dict) else type(raw).__name__
        raise InvalidArgument(
            f"{path} is not a CLIP-LoRA checkpoint: expected a dict with 'weights' and 'metadata' "
            f"(the paper's save_lora), found {keys}. For a PEFT adapter, pass its folder."
        )
    r, alpha, encoder, params, position = _metadata(raw["metadata"], path)
    weights = raw["weights"]
    if not isinstance(weights, dict):
        raise InvalidArgument(f"LoRA checkpoint {path}: 'weights' must be a dict of layer_i entries")

    blocks = adapted_blocks(encoder, position, {"text": text_blocks, "vision": vision_blocks})
    expected_keys = [f"layer_{i}" for i in range(len(blocks))]
    if sorted(weights, key=str) != sorted(expected_keys):
        raise InvalidArgument(
            f"LoRA checkpoint {path}: metadata (encoder={encoder}, position={position}) means "
            f"{len(blocks)} adapted blocks on this model (layer_0..layer_{len(blocks) - 1}), "
            f"but the file has {len(weights)} entries: {sorted(map(str, weights))[:6]}"
        )

    scale = alpha / math.sqrt(r)
    updates: list[LoraUpdate] = []
    for index, (tower, block) in enumerate(blocks):
        layer_key = f"layer_{index}"
        layer = weights[layer_key]
        if not isinstance(layer, dict):
            raise InvalidArgument(f"LoRA checkpoint {path}: {layer_key} must be a dict")
        wanted = {SAVED_NAME[t] for t in params}
        if set(layer) != wanted:
            raise InvalidArgument(
                f"LoRA checkpoint {path}: {layer_key} ({tower} block {block}) has {sorted(layer)}, "
                f"but metadata params={params} means {sorted(wanted)}"
            )
        for target in params:
            entry = layer[SAVED_NAME[target]]
            where = f"{layer_key}.{SAVED_NAME[target]} ({tower} block {block})"
            if not isinstance(entry, dict) or set(entry) != {"w_lora_A", "w_lora_B"}:
                raise InvalidArgument(f"LoRA checkpoint {path}: {where} must hold w_lora_A and w_lora_B")
            a = to_fp32_matrix(entry["w_lora_A"], f"{where}.w_lora_A")
            b = to_fp32_matrix(entry["w_lora_B"], f"{where}.w_lora_B")
            if a.shape[0] != r or b.shape[1] != r:
                raise InvalidArgument(
                    f"LoRA checkpoint {path}: {where} has rank {a.shape[0]}/{b.shape[1]} "
                    f"(A {tuple(a.shape)}, B {tuple(b.shape)}) but metadata r={r}"
                )
            updates.append(LoraUpdate(tower, block, target, a, b, scale))

    return LoraAdapter(
        format="clip-lora",
        source=str(path),
        sha256=sha256_file(path),
        rank=r,
        alpha=alpha,
        scaling="alpha/sqrt(r)",
        updates=tuple(updates),
        details={"encoder": encoder, "params": params, "position": position},
    )
