"""Class embeddings computed on the prompts' own length instead of CLIP's whole context.

open_clip's text tower runs every prompt over its full context (77 tokens for CLIP) and
keeps the output at the end-of-text token, the highest token id (``text_pool_type``
"argmax"). Its attention is causal, so no position sees a later one: the outputs up to
the longest prompt's end-of-text token are the same whether the padding after it goes
through the tower or not. Cutting the context there ("a photo of a cat." is 8 tokens) makes
`bank add`'s class embeddings several times cheaper, with open_clip's own ``encode_text``
doing the work on the shorter context. Only a model whose tower is exactly that (causal
mask, argmax pooling, one positional embedding per position) is cut; any other runs whole.

Values differ from the whole context's only by float rounding (sums over fewer masked
zeros): a bank add compares the class embeddings made so against the unmerged reference,
which runs the whole context (`cliplora.export.bank_verify`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cliplora.model import head


def used_length(model: nn.Module, tokens: torch.Tensor) -> int | None:
    """How many leading positions decide `model`'s text features of `tokens`: one past the
    last end-of-text token; None when cutting the context would not be exact for `model`."""
    mask = getattr(model, "attn_mask", None)
    positions = getattr(model, "positional_embedding", None)
    if getattr(model, "text_pool_type", None) != "argmax" or not isinstance(mask, torch.Tensor) \
            or not isinstance(positions, nn.Parameter) or tokens.ndim != 2 or len(tokens) == 0:
        return None
    context = tokens.shape[1]
    causal = torch.full((context, context), float("-inf"), dtype=mask.dtype).triu(1)
    if positions.shape[0] != context or mask.shape != causal.shape or not torch.equal(mask, causal):
        return None
    return int(tokens.argmax(dim=-1).max()) + 1


@contextmanager
def _context_of(model: nn.Module, length: int) -> Iterator[None]:
    """`model`'s positional embedding and causal mask cut to `length` positions (views), for
    the time of the block; put back however it ends."""
    positions, mask = model.positional_embedding, model.attn_mask
    model.positional_embedding = nn.Parameter(positions[:length], requires_grad=False)
    model.attn_mask = mask[:length, :length]
    try:
        yield
    finally:
        model.positional_embedding, model.attn_mask = positions, mask


@torch.no_grad()
def text_matrix(model: nn.Module, tokens: torch.Tensor, n_classes: int) -> torch.Tensor:
    """`cliplora.model.head.text_matrix` (T [D, C]), on the prompts' own length when exact."""
    length = used_length(model, tokens)
    if length is None or length >= tokens.shape[1]:
        return head.text_matrix(model, tokens, n_classes)
    with _context_of(model, length):
        return head.text_matrix(model, tokens[:, :length], n_classes)
