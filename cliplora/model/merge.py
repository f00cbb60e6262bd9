"""The merge: W' = W + scale · B @ A, in fp32, into a copy of the base model.

After the merge the model is the unchanged open_clip graph with different numbers in
it, which is why the adapted classifier costs exactly what the base one costs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.core.manifest import MergeRecord
from cliplora.model.lora import LoraAdapter, LoraUpdate, Target, Tower

_ROWS = {"q": 0, "k": 1, "v": 2}


def tower_blocks(model: nn.Module, tower: Tower) -> nn.ModuleList:
    """The residual blocks of `tower` in an open_clip CLIP."""
    return model.transformer.resblocks if tower == "text" else model.visual.transformer.resblocks


def attention_module(model: nn.Module, tower: Tower, block: int) -> nn.MultiheadAttention:
    """The attention module of `block` in `tower` of an open_clip CLIP."""
    blocks = tower_blocks(model, tower)
    if not 0 <= block < len(blocks):
        raise InvalidArgument(f"the adapter targets {tower} block {block}, but the {tower} tower has {len(blocks)} blocks")
    return blocks[block].attn


def target_weight(model: nn.Module, tower: Tower, block: int, target: Target) -> torch.Tensor:
    """A view of the weight matrix an update of `target` changes (``[d_out, d_in]``)."""
    attn = attention_module(model, tower, block)
    if target == "o":
        return attn.out_proj.weight.data
    width = attn.embed_dim
    start = _ROWS[target] * width
    return attn.in_proj_weight.data[start : start + width]


def check_shapes(update: LoraUpdate, weight: torch.Tensor) -> None:
    d_out, d_in = weight.shape
    if update.a.shape[1] != d_in or update.b.shape[0] != d_out or update.a.shape[0] != update.b.shape[1]:
        raise InvalidArgument(
            f"LoRA update of {update.name} does not fit the base model: A {tuple(update.a.shape)}, "
            f"B {tuple(update.b.shape)}, but the base projection is [{d_out}, {d_in}] "
            f"(needs A [r, {d_in}] and B [{d_out}, r]). Is the adapter for this --model?"
        )


@dataclass(frozen=True)
class MergeReport:
    updates: int
    max_abs_delta: float
    delta_norm: float  # Frobenius norm of all ΔW together

    def record(self, mode: str) -> MergeRecord:
        return MergeRecord(mode=mode, updates=self.updates, max_abs_delta_weight=self.max_abs_delta,
                           delta_weight_norm=self.delta_norm)


def merge_adapter(model: nn.Module, adapter: LoraAdapter) -> tuple[nn.Module, MergeReport]:
    """A merged deep copy of `model`; the base model is left untouched.

    Stops with an error naming the layer on a shape mismatch or a non-finite result.
    """
    merged = copy.deepcopy(model)
    return merged, merge_into(merged, adapter)


def merge_into(merged: nn.Module, adapter: LoraAdapter) -> MergeReport:
    """`merge_adapter`'s merge, into `merged` itself: for a caller that made its own copy
    (one that copies only the weights the adapter changes). Same checks and errors."""
    max_abs = 0.0
    squared = 0.0
    for update in adapter.updates:
        weight = target_weight(merged, update.tower, update.block, update.target)
        check_shapes(update, weight)
        delta = update.delta()
        result = weight.float() + delta
        if not torch.isfinite(result).all():
            raise FailedPrecondition(f"merging the LoRA update of {update.name} gives non-finite weights (inf/nan)")
        weight.copy_(result.to(weight.dtype))
        max_abs = max(max_abs, float(delta.abs().max()))
        squared += float(delta.double().pow(2).sum())
    merged.eval()
    return MergeReport(len(adapter.updates), max_abs, squared**0.5)
