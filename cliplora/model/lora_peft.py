"""PEFT LoRA adapters for Hugging Face CLIP (``adapter_config.json`` + weights).

Keys look like ``base_model.model.vision_model.encoder.layers.{i}.self_attn.q_proj.lora_A.weight``.
Hugging Face's q/k/v projections are the row slices [0:d], [d:2d], [2d:3d] of
open_clip's ``in_proj_weight`` and ``out_proj`` is ``out_proj``, so every update maps
onto the same targets as the paper's format. The scale is ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern``
overrides are honoured per module. Variants whose merge is not ``W + s·B·A`` (DoRA,
trained biases, extra trained modules) are refused, not approximated.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from cliplora.core.errors import InvalidArgument, NotFound
from cliplora.core.hashing import sha256_tree
from cliplora.model.checkpoint_io import load_tensors
from cliplora.model.lora import LoraAdapter, LoraUpdate, Target, Tower, to_fp32_matrix

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?(?P<tower>text_model|vision_model)\.encoder\.layers\."
    r"(?P<block>\d+)\.self_attn\.(?P<proj>q_proj|k_proj|v_proj|out_proj)\.lora_(?P<ab>[AB])"
    r"(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
_TOWER: dict[str, Tower] = {"text_model": "text", "vision_model": "vision"}
_TARGET: dict[str, Target] = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key that matches the module path's end."""
    for key, value in patterns.items():
        if re.match(rf"(^|.*\.){key}$", module):
            return value
    return default


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise NotFound(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidArgument(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    refusals = {
        "use_dora": "DoRA adapters rescale weights by a learned magnitude; W + s·B·A does not describe them",
        "lora_bias": "adapters with a LoRA bias are not supported",
        "fan_in_fan_out": "fan_in_fan_out is for Conv1D layers, which CLIP does not have",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise InvalidArgument(f"{path}: {key} is set: {why}")
    if config.get("bias", "none") != "none":
        raise InvalidArgument(f"{path}: bias={config['bias']!r}: adapters that train biases are not supported")
    if config.get("modules_to_save"):
        raise InvalidArgument(
            f"{path}: modules_to_save={config['modules_to_save']}: fully trained extra modules are not supported"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InvalidArgument(f"{path}: {key} must be a positive number, got {value!r}")
    return config


def _weight_pairs(folder: Path) -> tuple[Path, dict[tuple[str, int, str], dict[str, Any]]]:
    """The weight file and its tensors by (tower, block, projection) -> {"A": ..., "B": ...}."""
    weight_file = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weight_file is None:
        raise NotFound(f"PEFT adapter {folder} has no {' or '.join(WEIGHT_FILES)}")
    tensors = load_tensors(weight_file, "PEFT adapter weights")
    if not isinstance(tensors, dict) or not tensors:
        raise InvalidArgument(f"PEFT adapter weights {weight_file} hold no tensors")
    pairs: dict[tuple[str, int, str], dict[str, Any]] = {}
    for key, value in tensors.items():
        match = _KEY.match(str(key))
        if match is None:
            raise InvalidArgument(
                f"PEFT adapter {weight_file}: cannot merge {key!r}; only LoRA on the self-attention "
                "q/k/v/out projections of the CLIP text and vision encoders is supported"
            )
        slot = (match["tower"], int(match["block"]), match["proj"])
        pairs.setdefault(slot, {})[match["ab"]] = value
    return weight_file, pairs


def _update(config: dict[str, Any], slot: tuple[str, int, str], ab: dict[str, Any], weight_file: Path) -> LoraUpdate:
    """One projection's update, its rank and alpha from the config (patterns honoured)."""
    hf_tower, block, proj = slot
    module = f"{hf_tower}.encoder.layers.{block}.self_attn.{proj}"
    if set(ab) != {"A", "B"}:
        raise InvalidArgument(f"PEFT adapter {weight_file}: {module} has lora_{''.join(ab)} but not both A and B")
    a = to_fp32_matrix(ab["A"], f"{module}.lora_A")
    b = to_fp32_matrix(ab["B"], f"{module}.lora_B")
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    if a.shape[0] != r or b.shape[1] != r:
        raise InvalidArgument(
            f"PEFT adapter {weight_file}: {module} has rank {a.shape[0]}/{b.shape[1]} "
            f"(A {tuple(a.shape)}, B {tuple(b.shape)}) but the config says r={r}"
        )
    scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return LoraUpdate(_TOWER[hf_tower], block, _TARGET[proj], a, b, scale)


def load_peft_adapter(folder: Path) -> LoraAdapter:
    """Read a PEFT LoRA folder into a `LoraAdapter`."""
    config = _read_config(folder)
    weight_file, pairs = _weight_pairs(folder)
    updates = [_update(config, slot, ab, weight_file) for slot, ab in sorted(pairs.items())]
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    return LoraAdapter(
        format="peft",
        source=str(folder),
        sha256=sha256_tree(folder),
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        scaling="lora_alpha/sqrt(r)" if use_rslora else "lora_alpha/r",
        updates=tuple(updates),
        details={
            "use_rslora": use_rslora,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "base_model_name_or_path": config.get("base_model_name_or_path"),
        },
    )
