"""Trainable LoRA on CLIP's attention, as the CLIP-LoRA paper trains it.

Each adapted block's attention becomes the export's `LoraAttention` (the unmerged
reference the exporter verifies against), with a trainable branch per projection:
``x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ`` with ``s = alpha / sqrt(r)``, A initialised
Kaiming-uniform (a = √5) and B at zero, so training starts exactly at the base model.
The base weights are buffers there: only A and B are parameters.

Blocks are listed text tower first, then vision, each by increasing index, which is
the order of the paper's ``layer_i`` keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cliplora.finetune.options import LoraSpec
from cliplora.model.lora import TOWERS, Tower
from cliplora.model.lora_paper import SAVED_NAME
from cliplora.model.lora_targets import adapted_blocks
from cliplora.model.merge import tower_blocks
from cliplora.model.reference import LoraAttention


class TrainableLoraBranch(nn.Module):
    """s · (dropout(x) @ Aᵀ) @ Bᵀ with trainable A [r, d_in] and B [d_out, r]."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.w_lora_A = nn.Parameter(torch.empty(r, d_in))
        self.w_lora_B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.w_lora_A, a=math.sqrt(5))
        self.scale = alpha / math.sqrt(r)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.w_lora_A.t()) @ self.w_lora_B.t() * self.scale


@dataclass(frozen=True)
class AdaptedBlock:
    tower: Tower
    block: int
    attention: LoraAttention


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[AdaptedBlock]:
    """Freeze `model` and put trainable LoRA attention in the blocks `spec` names, in place."""
    model.requires_grad_(False)
    adapted: list[AdaptedBlock] = []
    sizes = {tower: len(tower_blocks(model, tower)) for tower in TOWERS}
    for tower, index in adapted_blocks(spec.encoder, spec.position, sizes):
        block = tower_blocks(model, tower)[index]
        attention = LoraAttention(block.attn)
        d = attention.width
        for target in spec.ordered_params:
            attention.add_branch(target, TrainableLoraBranch(d, d, spec.r, spec.alpha, spec.dropout))
        block.attn = attention
        adapted.append(AdaptedBlock(tower, index, attention))
    return adapted


def lora_parameters(adapted: Sequence[AdaptedBlock]) -> list[nn.Parameter]:
    return [p for block in adapted for p in block.attention.branches.parameters()]


def paper_checkpoint(adapted: Sequence[AdaptedBlock], spec: LoraSpec) -> dict[str, Any]:
    """``{"weights": {"layer_i": {"q_proj": {"w_lora_A", "w_lora_B"}, ...}}, "metadata"}``.

    fp32 CPU tensors, detached copies: the file loads anywhere, with ``weights_only``.
    """
    weights: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for index, block in enumerate(adapted):
        layer = {}
        for target in spec.ordered_params:
            branch = block.attention.branches[target]
            layer[SAVED_NAME[target]] = {
                "w_lora_A": branch.w_lora_A.detach().float().cpu().clone(),
                "w_lora_B": branch.w_lora_B.detach().float().cpu().clone(),
            }
        weights[f"layer_{index}"] = layer
    return {"weights": weights, "metadata": spec.metadata()}
