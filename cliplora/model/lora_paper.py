"""The CLIP-LoRA paper's checkpoint format (its code's ``save_lora``).

``torch.save({"weights": {"layer_{i}": {"q_proj"|"k_proj"|"v_proj"|"proj":
{"w_lora_A": [r, d], "w_lora_B": [d, r]}}}, "metadata": {"r", "alpha", "encoder",
"params", "position"}})``.

- ``layer_i`` runs over the adapted blocks in order: text blocks first, then vision
  blocks, each by increasing block index, as the paper's ``apply_lora`` lists them.
- ``encoder`` is text | vision | both; ``params`` ⊆ [q, k, v, o] (``o`` is saved as
  ``proj``, the attention output projection).
- ``position`` names the blocks (`cliplora.model.lora_targets.block_indices`).
- The scale is ``alpha / sqrt(r)`` (the paper's ``LinearLoRA``), not ``alpha / r``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cliplora.core.errors import InvalidArgument
from cliplora.core.hashing import sha256_file
from cliplora.model.checkpoint_io import load_tensors
from cliplora.model.lora import LoraAdapter, LoraUpdate, Target, Tower, to_fp32_matrix
from cliplora.model.lora_targets import ENCODERS, TARGETS, adapted_blocks

SAVED_NAME: dict[Target, str] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}


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
    if not isinstance(params, (list, tuple)) or not params or any(p not in TARGETS for p in params):
        raise InvalidArgument(f"LoRA checkpoint {path}: metadata params must be a subset of q, k, v, o, got {params!r}")
    if not isinstance(position, str):
        raise InvalidArgument(f"LoRA checkpoint {path}: metadata position must be a string, got {position!r}")
    ordered = [t for t in TARGETS if t in params]
    return r, float(alpha), encoder, ordered, position


def _read_checkpoint(path: Path) -> dict[str, Any]:
    raw = load_tensors(path, "LoRA checkpoint")
    if not isinstance(raw, dict) or "weights" not in raw or "metadata" not in raw:
        keys = sorted(raw)[:5] if isinstance(raw, dict) else type(raw).__name__
        raise InvalidArgument(
            f"{path} is not a CLIP-LoRA checkpoint: expected a dict with 'weights' and 'metadata' "
            f"(the paper's save_lora), found {keys}. For a PEFT adapter, pass its folder."
        )
    return raw


def _check_layer_keys(weights: dict[Any, Any], blocks: list[tuple[Tower, int]], encoder: str, position: str,
                      path: Path) -> None:
    expected_keys = [f"layer_{i}" for i in range(len(blocks))]
    if sorted(weights, key=str) != sorted(expected_keys):
        raise InvalidArgument(
            f"LoRA checkpoint {path}: metadata (encoder={encoder}, position={position}) means "
            f"{len(blocks)} adapted blocks on this model (layer_0..layer_{len(blocks) - 1}), "
            f"but the file has {len(weights)} entries: {sorted(map(str, weights))[:6]}"
        )


def _layer_updates(layer: Any, index: int, tower: Tower, block: int, params: list[Target], r: int, scale: float,
                   path: Path) -> list[LoraUpdate]:
    """The updates of one ``layer_i`` entry, each checked against the metadata's params and rank."""
    layer_key = f"layer_{index}"
    if not isinstance(layer, dict):
        raise InvalidArgument(f"LoRA checkpoint {path}: {layer_key} must be a dict")
    wanted = {SAVED_NAME[t] for t in params}
    if set(layer) != wanted:
        raise InvalidArgument(
            f"LoRA checkpoint {path}: {layer_key} ({tower} block {block}) has {sorted(layer)}, "
            f"but metadata params={params} means {sorted(wanted)}"
        )
    updates = []
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
    return updates


def load_clip_lora_checkpoint(path: Path, *, text_blocks: int, vision_blocks: int) -> LoraAdapter:
    """Read a paper-format checkpoint and check it against its own metadata and the model."""
    raw = _read_checkpoint(path)
    r, alpha, encoder, params, position = _metadata(raw["metadata"], path)
    weights = raw["weights"]
    if not isinstance(weights, dict):
        raise InvalidArgument(f"LoRA checkpoint {path}: 'weights' must be a dict of layer_i entries")
    blocks = adapted_blocks(encoder, position, {"text": text_blocks, "vision": vision_blocks})
    _check_layer_keys(weights, blocks, encoder, position, path)
    scale = alpha / math.sqrt(r)
    updates = [update for index, (tower, block) in enumerate(blocks)
               for update in _layer_updates(weights[f"layer_{index}"], index, tower, block, params, r, scale, path)]
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
