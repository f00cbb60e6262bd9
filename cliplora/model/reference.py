"""The independent reference: the adapter applied *unmerged*, as it was trained.

Every attention module of a copy of the base model is replaced by `LoraAttention`,
which computes attention from scratch (its own projections, head split, softmax) and
adds each low-rank branch to its projection's output: ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``. It
shares no code with the merge nor with PyTorch's fused attention, so agreement between
the two is evidence, not tautology. `--unmerged` exports exactly this model, the naive
way to serve an adapter.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cliplora.model.lora import TOWERS, LoraAdapter, Target
from cliplora.model.merge import attention_module, check_shapes, target_weight, tower_blocks


class LoraBranch(nn.Module):
    """s · (x @ Aᵀ) @ Bᵀ."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("a", a.clone())
        self.register_buffer("b", b.clone())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a.t()) @ self.b.t() * self.scale


class LoraAttention(nn.Module):
    """Multi-head attention with optional LoRA branches on q, k, v and the output."""

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        if attn.in_proj_weight is None or attn.in_proj_bias is None or attn.bias_k is not None:
            raise ValueError("only packed-projection attention with biases is supported")
        self.heads = attn.num_heads
        self.width = attn.embed_dim
        self.batch_first = attn.batch_first
        w, b = attn.in_proj_weight.detach(), attn.in_proj_bias.detach()
        d = self.width
        for i, name in enumerate("qkv"):
            self.register_buffer(f"w_{name}", w[i * d : (i + 1) * d].clone())
            self.register_buffer(f"b_{name}", b[i * d : (i + 1) * d].clone())
        self.register_buffer("w_o", attn.out_proj.weight.detach().clone())
        self.register_buffer("b_o", attn.out_proj.bias.detach().clone())
        self.branches = nn.ModuleDict()

    def add_branch(self, target: Target, branch: LoraBranch) -> None:
        self.branches[target] = branch

    def _project(self, x: torch.Tensor, target: str) -> torch.Tensor:
        y = F.linear(x, getattr(self, f"w_{target}"), getattr(self, f"b_{target}"))
        if target in self.branches:
            y = y + self.branches[target](x)
        return y

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape
        head_dim = self.width // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, -1, self.heads, head_dim).transpose(1, 2)

        q = heads(self._project(query, "q"))
        k = heads(self._project(key, "k"))
        v = heads(self._project(value, "v"))
        scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(attn_mask, float("-inf"))
            scores = scores + attn_mask
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, self.width)
        out = self._project(out, "o")
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def build_reference(model: nn.Module, adapter: LoraAdapter | None, *, share_weights: bool = False) -> nn.Module:
    """A copy of `model` with every attention replaced by `LoraAttention` (+ the adapter).

    `share_weights`: the copy's modules hold `model`'s own tensors instead of copies (the
    reference only reads them, and `LoraAttention` clones what it keeps), which saves a whole
    copy of the model (seconds for a ViT-B/16); `model` must then not be changed while the
    reference is in use."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())} if share_weights else None
    reference = copy.deepcopy(model, shared)
    for tower in TOWERS:
        for block in tower_blocks(reference, tower):
            block.attn = LoraAttention(block.attn)
    for update in adapter.updates if adapter else ():
        # Shapes are checked against the *base* projection, as in the merge.
        check_shapes(update, target_weight(model, update.tower, update.block, update.target))
        attn = attention_module(reference, update.tower, update.block)
        attn.add_branch(update.target, LoraBranch(update.a, update.b, update.scale))
    return reference.eval()
