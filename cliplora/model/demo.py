"""The demo models' inputs: classes, prompt template, names and a synthetic adapter.

`make serve` exports a base and a LoRA model from these (`cliplora.demo`); the load
tests, the soak and the GPU check use the same inputs, so every figure in
docs/benchmarks.md is about the same pair of models. The adapter is a seeded,
synthetic paper-format checkpoint (both encoders, q/k/v, all blocks, r = 2,
alpha = 1) that stands in for a trained one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cliplora.core.repository import render_labels
from cliplora.model.base_model import resolve_model_config
from cliplora.model.lora_targets import block_indices

CLASSES = ["abyssinian", "bengal", "birman", "bombay", "british_shorthair", "egyptian_mau", "maine_coon",
           "persian", "ragdoll", "russian_blue"]
TEMPLATE = "a photo of a {}, a type of pet."
BASE_NAME = "pets-base"
LORA_NAME = "pets-lora"
SEED = 2024
MODEL_ENV = "CLIPLORA_DEMO_MODEL"
DEFAULT_MODEL = "ViT-B-16"


def synthetic_adapter(model: str, path: Path, seed: int = SEED) -> Path:
    """A paper-format checkpoint with small seeded updates (stands in for a trained one)."""
    _, config = resolve_model_config(model)
    towers = [("text", config["text_cfg"]["width"], config["text_cfg"]["layers"]),
              ("vision", config["vision_cfg"]["width"], config["vision_cfg"]["layers"])]
    generator = torch.Generator().manual_seed(seed)
    weights, index = {}, 0
    for _tower, width, layers in towers:
        for _block in block_indices("all", layers):
            weights[f"layer_{index}"] = {
                name: {"w_lora_A": torch.randn(2, width, generator=generator) * 0.02,
                       "w_lora_B": torch.randn(width, 2, generator=generator) * 0.02}
                for name in ("q_proj", "k_proj", "v_proj")
            }
            index += 1
    metadata = {"r": 2, "alpha": 1, "encoder": "both", "params": ["q", "k", "v"], "position": "all"}
    torch.save({"weights": weights, "metadata": metadata}, path)
    return path


def demo_model() -> str:
    """The demo's architecture: ``CLIPLORA_DEMO_MODEL``, default ViT-B-16."""
    return os.environ.get(MODEL_ENV, DEFAULT_MODEL)


def write_inputs(folder: Path, model: str) -> tuple[Path, Path]:
    """The demo's export inputs in `folder`: (classes.txt, lora_demo.pt)."""
    classes = folder / "classes.txt"
    classes.write_text(render_labels(CLASSES), encoding="utf-8")
    return classes, synthetic_adapter(model, folder / "lora_demo.pt")
