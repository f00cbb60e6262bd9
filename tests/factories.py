"""Tiny real CLIP models, adapters in every supported format, and images, made here.

Nothing is downloaded: models come from open_clip's own factory with a custom config
(random weights are fine in tests), adapters are written in the paper's format and as
PEFT folders by the functions below, and images are generated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from tests.images import make_image  # noqa: F401  (re-exported: many tests make images through factories)

TEXT_WIDTH = 64
VISION_WIDTH = 96  # differs from the text width, so a tower mix-up cannot go unnoticed
BLOCKS = 12  # as in ViT-B: every paper position is meaningful
IMAGE_SIZE = 32

TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": BLOCKS, "width": VISION_WIDTH, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 2, "layers": BLOCKS},
}

# The paper's index lists for 12-block towers, written out (not computed by the code under test).
PAPER_POSITIONS = {
    "all": list(range(12)),
    "bottom": [0, 1, 2, 3],
    "mid": [4, 5, 6, 7],
    "up": [8, 9, 10, 11],
    "half-up": [6, 7, 8, 9, 10, 11],
    "half-bottom": [0, 1, 2, 3, 4, 5],
    "top1": [11],
    "top2": [10, 11],
    "top3": [9, 10, 11],
    "top": [11],
}
SAVED = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
HF_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


def write_config(folder: Path, name: str = "tiny-clip", **overrides: object) -> Path:
    config = json.loads(json.dumps(TINY_CONFIG))
    config.update(overrides)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def projection(model: torch.nn.Module, tower: str, block: int, target: str) -> torch.Tensor:
    """The weight a LoRA target changes, sliced here by hand (not by the code under test)."""
    blocks = model.transformer.resblocks if tower == "text" else model.visual.transformer.resblocks
    attn = blocks[block].attn
    if target == "o":
        return attn.out_proj.weight.detach()
    d = attn.embed_dim
    i = "qkv".index(target)
    return attn.in_proj_weight.detach()[i * d : (i + 1) * d]


def width(tower: str) -> int:
    return TEXT_WIDTH if tower == "text" else VISION_WIDTH


def adapted_blocks(encoder: str, position: str) -> list[tuple[str, int]]:
    towers = {"text": ["text"], "vision": ["vision"], "both": ["text", "vision"]}[encoder]
    return [(tower, i) for tower in towers for i in PAPER_POSITIONS[position]]


def paper_checkpoint(
    *,
    encoder: str = "both",
    params: Iterable[str] = ("q", "k", "v"),
    position: str = "all",
    r: int = 2,
    alpha: float = 1.0,
    seed: int = 0,
    magnitude: float = 0.2,
) -> dict:
    """A checkpoint exactly as the paper's save_lora writes it (random, non-zero B)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for index, (tower, _block) in enumerate(adapted_blocks(encoder, position)):
        d = width(tower)
        weights[f"layer_{index}"] = {
            SAVED[p]: {
                "w_lora_A": torch.randn(r, d, generator=generator) * magnitude,
                "w_lora_B": torch.randn(d, r, generator=generator) * magnitude,
            }
            for p in params
        }
    metadata = {"r": r, "alpha": alpha, "encoder": encoder, "params": list(params), "position": position}
    return {"weights": weights, "metadata": metadata}


def write_paper_checkpoint(path: Path, **kwargs: object) -> Path:
    torch.save(paper_checkpoint(**kwargs), path)
    return path


def write_peft_adapter(
    folder: Path,
    *,
    modules: Iterable[tuple[str, int, str]] = (("vision", 0, "q"), ("vision", 5, "v"), ("text", 3, "k"), ("text", 11, "o")),
    r: int = 4,
    alpha: float = 8.0,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    seed: int = 0,
    config_overrides: dict | None = None,
) -> Path:
    """A PEFT LoRA folder for Hugging Face CLIP, keys as PEFT saves them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for tower, block, target in modules:
        hf_tower = "text_model" if tower == "text" else "vision_model"
        module = f"{hf_tower}.encoder.layers.{block}.self_attn.{HF_PROJ[target]}"
        rank = r
        for key, value in (rank_pattern or {}).items():
            if module.endswith(key):
                rank = value
        d = width(tower)
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d, generator=generator) * 0.2
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(d, rank, generator=generator) * 0.2
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "bias": "none",
        "lora_dropout": 0.1,
        "base_model_name_or_path": "openai/clip-vit-base-patch16",
        **(config_overrides or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def expected_scale(alpha: float, r: int, rule: str) -> float:
    return alpha / math.sqrt(r) if rule == "sqrt" else alpha / r


def write_classes(path: Path, names: Iterable[str] = ("cat", "dog", "red_panda", "golden_retriever")) -> Path:
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def write_shapes_dataset(root: Path, per_class: int, seed: int = 0) -> Path:
    """The coloured-shapes task of `cliplora.finetune.demo_data`: one sub-folder per colour."""
    from cliplora.finetune.demo_data import write_shapes

    return write_shapes(root, per_class, seed=seed)


def tree_snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for folders), to prove nothing changed."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }
