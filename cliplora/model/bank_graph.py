"""The adapter bank's graph: one image tower, many adapters, the adapter picked per sample.

``image`` [N, S, S, 3] uint8 and ``adapter`` [N, 1] int32 (a slot) -> the preprocessing and
image tower of `cliplora.model.graph.ClassifierGraph` -> L2 normalisation ->
``image_embeds`` [N, D] fp32. In every vision block, each of the bank's matrices (q, k, v:
row slices of ``in_proj_weight``; o: ``out_proj``) gets a low-rank branch whose factors are
gathered per sample from stacks of every adapter's factors::

    delta(x)[n] = (x[n] · A[slot[n]]ᵀ) · B[slot[n]]ᵀ      A: [K, R, d_in], B: [K, d_out, R]

with the adapter's scale folded into B and ranks below R zero-padded (exact: padded rows
of A meet padded columns of B). Slot 0 is the base model (all zeros). The stacks are
ONNX initializers named by `stack_name`; a new bank version changes only their values and
their first dimension K, never a node (`cliplora.export.bank_store`).

A negative slot is turned into an index past any stack, so ONNX Runtime refuses it
("indices element out of data bounds") instead of Gather's wrap-around picking the last
adapter.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from cliplora.core import contract
from cliplora.model.graph import OPSET
from cliplora.model.merge import tower_blocks

OUT_OF_RANGE = 2**31 - 1  # where a negative slot is sent: past any stack, so Gather fails loudly
BANK_MATRICES = contract.BANK_MATRICES


def stack_name(block: int, matrix: str, factor: str) -> str:
    """The initializer holding factor ``a`` or ``b`` of `matrix` in vision block `block`, for every slot."""
    return f"bank.block{block}.{matrix}.{factor}"


def stack_names(blocks: int, matrices: Sequence[str]) -> list[str]:
    """Every stack of a bank, in the order its factors file stores them."""
    return [stack_name(b, m, f) for b in range(blocks) for m in matrices for f in ("a", "b")]


class BatchSlots:
    """The current batch's slots, shared by every branch of one graph (set by `BankGraph.forward`, `BankTextGraph.forward`)."""

    value: torch.Tensor | None = None


class BankAttention(nn.Module):
    """Self-attention with the base projections of an `nn.MultiheadAttention` plus, for each
    bank matrix, the low-rank branch of each sample's own adapter.

    Computes what `nn.MultiheadAttention` computes for self-attention (q = k = v input; an
    additive float mask, as the text tower's causal mask, or none), written out so that the
    branches can be added after the projections. Used in both towers
    (`cliplora.model.bank_text_graph` for the text one).
    """

    def __init__(self, attn: nn.MultiheadAttention, matrices: Sequence[str], rank: int, slots: BatchSlots,
                 seed: int) -> None:
        super().__init__()
        if attn.in_proj_weight is None or attn.in_proj_bias is None or not attn.batch_first:
            raise ValueError("only batch-first, packed-projection attention with biases is supported")
        self.heads, self.width, self.slots = attn.num_heads, attn.embed_dim, slots
        self.matrices = tuple(matrices)
        self.register_buffer("w_in", attn.in_proj_weight.detach().clone())
        self.register_buffer("b_in", attn.in_proj_bias.detach().clone())
        self.register_buffer("w_o", attn.out_proj.weight.detach().clone())
        self.register_buffer("b_o", attn.out_proj.bias.detach().clone())
        # Distinct placeholder values: the exporter merges initializers of equal value, and
        # every stack must stay an initializer of its own (`cliplora.export.bank_store` zeroes them).
        generator = torch.Generator().manual_seed(seed)
        for m in self.matrices:
            self.register_buffer(f"stack_a_{m}", torch.randn(1, rank, self.width, generator=generator))
            self.register_buffer(f"stack_b_{m}", torch.randn(1, self.width, rank, generator=generator))

    def _branch(self, x: torch.Tensor, matrix: str) -> torch.Tensor:
        assert self.slots.value is not None, "BankAttention runs inside BankGraph"
        a = getattr(self, f"stack_a_{matrix}").index_select(0, self.slots.value)  # [N, R, d_in]
        b = getattr(self, f"stack_b_{matrix}").index_select(0, self.slots.value)  # [N, d_out, R]
        return torch.matmul(torch.matmul(x, a.transpose(1, 2)), b.transpose(1, 2))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if attn_mask is not None and (attn_mask.dtype == torch.bool or attn_mask.dim() != 2):
            raise ValueError("a bank's attention takes an additive [L, L] mask (the text tower's causal one) or none")
        x = query
        batch, length, _ = x.shape
        head_dim = self.width // self.heads
        q, k, v = F.linear(x, self.w_in, self.b_in).chunk(3, dim=-1)
        projected = {"q": q, "k": k, "v": v}
        for m in self.matrices:
            if m != "o":
                projected[m] = projected[m] + self._branch(x, m)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, head_dim).transpose(1, 2)

        q, k, v = heads(projected["q"]) * head_dim**-0.5, heads(projected["k"]), heads(projected["v"])
        scores = torch.matmul(q, k.transpose(-2, -1))
        if attn_mask is not None:  # as nn.MultiheadAttention adds a float mask
            scores = scores + attn_mask
        mixed = (scores.softmax(dim=-1) @ v).transpose(1, 2)
        mixed = mixed.reshape(batch, length, self.width)
        out = F.linear(mixed, self.w_o, self.b_o)
        if "o" in self.matrices:
            out = out + self._branch(mixed, "o")
        return out, None


class BankGraph(nn.Module):
    """The bank as one module, the thing exported: preprocessing, the image tower with a
    `BankAttention` in every block, L2 normalisation."""

    def __init__(self, model: nn.Module, matrices: Sequence[str], rank: int, mean: tuple[float, float, float],
                 std: tuple[float, float, float]) -> None:
        super().__init__()
        unknown = set(matrices) - set(BANK_MATRICES)
        if unknown or not matrices or rank < 1:
            raise ValueError(f"a bank needs matrices among {BANK_MATRICES} and a rank >= 1, got {matrices}, {rank}")
        self.slots = BatchSlots()
        self.visual = copy.deepcopy(model.visual)
        for index, block in enumerate(self.visual.transformer.resblocks):
            block.attn = BankAttention(block.attn, matrices, rank, self.slots, seed=index)
        self.blocks = len(tower_blocks(model, "vision"))
        self.matrices = tuple(m for m in BANK_MATRICES if m in matrices)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
        slots = adapter.reshape(-1).long()
        self.slots.value = torch.where(slots < 0, torch.full_like(slots, OUT_OF_RANGE), slots)
        try:
            x = (image.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
            return F.normalize(self.visual(x).float(), dim=-1)
        finally:
            self.slots.value = None

    def stacks(self) -> dict[str, torch.Tensor]:
        """The placeholder stacks by initializer name (`stack_name`)."""
        found = {}
        for index, block in enumerate(self.visual.transformer.resblocks):
            for m in self.matrices:
                for factor in ("a", "b"):
                    found[stack_name(index, m, factor)] = getattr(block.attn, f"stack_{factor}_{m}")
        return found


def export_bank(graph: BankGraph, image_size: int, path: Path) -> dict[str, str]:
    """Write the bank to `path` (weights inline) with a dynamic batch dimension, and check the
    file. Returns {stack name: the initializer's name in the file}, found by value (the
    exporter names buffers as it likes)."""
    example = torch.zeros((2, image_size, image_size, contract.CHANNELS), dtype=torch.uint8)
    adapter = torch.tensor([[0], [0]], dtype=torch.int32)
    inputs, outputs = [contract.INPUT_NAME, contract.BANK_ADAPTER_NAME], [contract.BANK_OUTPUT_NAME]
    graph.eval()
    # As `cliplora.model.graph` exports: TorchScript exporter, opset 17, traced with gradients
    # on (nn.MultiheadAttention's fused path has no ONNX form; BankAttention has none anyway).
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example, adapter), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path), full_check=True)
    return find_stacks(onnx.load(str(path)), graph.stacks(), "bank")


def find_stacks(model: onnx.ModelProto, stacks: dict[str, torch.Tensor], what: str) -> dict[str, str]:
    """{stack name: the initializer's name in `model`} for the placeholder `stacks`, found by
    value (the exporter names buffers as it likes); RuntimeError when one is missing."""
    from onnx import numpy_helper

    wanted = {name: tensor.numpy() for name, tensor in stacks.items()}
    found: dict[str, str] = {}
    for initializer in model.graph.initializer:
        if len(initializer.dims) != 3 or initializer.dims[0] != 1:
            continue
        values = numpy_helper.to_array(initializer)
        for name, expected in wanted.items():
            if name not in found and values.shape == expected.shape and (values == expected).all():
                found[name] = initializer.name
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise RuntimeError(f"the exported {what} lost its factor stacks {missing[:4]} (folded or merged by the exporter)")
    return found
