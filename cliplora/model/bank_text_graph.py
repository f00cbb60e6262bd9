"""The text side of an adapter bank with open vocabulary (``NAME_text``): one text tower,
the adapter picked per sample.

``tokens`` [N, 77] int32 (open_clip's ids) and ``adapter`` [N, 1] int32 (the bank's slot)
-> open_clip's own text tower (token and position embeddings, the blocks under the causal
mask, final norm, pooling at the end token, projection) -> L2 normalisation ->
``text_embeds`` [N, D] fp32. In every text block each of the bank's matrices gets the
low-rank branch of `cliplora.model.bank_graph.BankAttention`, its factors gathered per
sample from stacks of every slot's text factors (`text_stack_name`)::

    delta(x)[n] = (x[n] · A[slot[n]]ᵀ) · B[slot[n]]ᵀ      A: [K, R, d_in], B: [K, d_out, R]

The slots are the bank's: slot k holds adapter k's text-side updates (zeros when it has
none, and for the base, slot 0), so slot k of ``NAME_text`` is adapter k's own adapted
text encoder as slot k of the bank is its image encoder. As in the bank, a new version
changes only the stacks (their values and K), never a node, and a negative slot is sent
past the stacks so that ONNX Runtime refuses it.
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
from cliplora.model.bank_graph import (
    BANK_MATRICES,
    OUT_OF_RANGE,
    BankAttention,
    BatchSlots,
    find_stacks,
)
from cliplora.model.graph import OPSET
from cliplora.model.merge import tower_blocks

TEXT_STACK_PREFIX = "bank_text"


def text_stack_name(block: int, matrix: str, factor: str) -> str:
    """The initializer holding factor ``a`` or ``b`` of `matrix` in text block `block`, for every slot."""
    return f"{TEXT_STACK_PREFIX}.block{block}.{matrix}.{factor}"


class BankTextGraph(nn.Module):
    """The bank's text encoder as one module, the thing exported: a copy of the text tower
    (no image tower) with a `BankAttention` in every block, L2 normalisation."""

    def __init__(self, model: nn.Module, matrices: Sequence[str], rank: int) -> None:
        super().__init__()
        unknown = set(matrices) - set(BANK_MATRICES)
        if unknown or not matrices or rank < 1:
            raise ValueError(f"a bank needs matrices among {BANK_MATRICES} and a rank >= 1, got {matrices}, {rank}")
        self.slots = BatchSlots()
        self.clip = copy.deepcopy(model, memo={id(model.visual): None})  # the text tower's size, not the model's
        self.matrices = tuple(m for m in BANK_MATRICES if m in matrices)
        for index, block in enumerate(tower_blocks(self.clip, "text")):
            block.attn = BankAttention(block.attn, self.matrices, rank, self.slots, seed=index)

    def forward(self, tokens: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
        slots = adapter.reshape(-1).long()
        self.slots.value = torch.where(slots < 0, torch.full_like(slots, OUT_OF_RANGE), slots)
        try:
            return F.normalize(self.clip.encode_text(tokens.long()).float(), dim=-1)
        finally:
            self.slots.value = None

    def stacks(self) -> dict[str, torch.Tensor]:
        """The placeholder stacks by initializer name (`text_stack_name`)."""
        found = {}
        for index, block in enumerate(tower_blocks(self.clip, "text")):
            for m in self.matrices:
                for factor in ("a", "b"):
                    found[text_stack_name(index, m, factor)] = getattr(block.attn, f"stack_{factor}_{m}")
        return found


def export_bank_text(graph: BankTextGraph, path: Path, start_token: int, end_token: int) -> dict[str, str]:
    """Write the text encoder to `path` (weights inline) with a dynamic batch dimension, and
    check the file. Returns {stack name: the initializer's name in the file}."""
    tokens = torch.zeros((2, contract.CONTEXT_LENGTH), dtype=torch.int32)
    tokens[:, 0], tokens[0, 1], tokens[1, 5] = start_token, end_token, end_token  # as export_text_encoder
    adapter = torch.tensor([[0], [0]], dtype=torch.int32)
    inputs, outputs = [contract.TEXT_INPUT_NAME, contract.BANK_ADAPTER_NAME], [contract.TEXT_OUTPUT_NAME]
    graph.eval()
    # As `cliplora.model.bank_graph.export_bank`: TorchScript exporter, opset 17, gradients on.
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (tokens, adapter), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in (*inputs, *outputs)},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(str(path), full_check=True)
    return find_stacks(onnx.load(str(path)), graph.stacks(), "bank text encoder")
