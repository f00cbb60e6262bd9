"""An adapter as a bank holds it: its vision factors in one slot, its classes as embeddings.

- `slot_factors`: each vision update becomes the slot's A [R, d_in] and B [d_out, R] (the
  scale folded into B, ranks below R zero-padded: exact), after the refusals a bank makes:
  a rank above its max rank, a vision matrix it does not hold, a shape that does not fit
  the base, a value that is not finite. A bank with open vocabulary holds the text updates
  the same way, in the stacks of its text encoder (`cliplora.model.bank_text_graph`), and
  refuses a text matrix it does not hold too.
- `class_embeddings`: the adapter's classes encoded by its own adapted text tower (its
  text updates merged into a copy of the matrices they change; no text updates: the base
  tower), templates averaged and re-normalised exactly as export's head
  (`cliplora.model.head`), on the prompts' own length (`cliplora.model.prompt_length`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from cliplora.core.errors import InvalidArgument
from cliplora.model import head, prompt_length
from cliplora.model.bank_graph import stack_name
from cliplora.model.bank_text_graph import text_stack_name
from cliplora.model.lora import LoraAdapter, LoraUpdate, Tower
from cliplora.model.merge import (
    attention_module,
    check_shapes,
    merge_into,
    target_weight,
    tower_blocks,
)


@dataclass(frozen=True)
class AdapterShape:
    """What a bank's table says about an adapter."""

    rank: int  # its largest update rank (PEFT's rank_pattern may give several)
    matrices: tuple[str, ...]  # the projections it updates, both towers
    encoders: tuple[str, ...]  # the towers it updates


def adapter_shape(adapter: LoraAdapter) -> AdapterShape:
    return AdapterShape(
        rank=max(u.rank for u in adapter.updates),
        matrices=tuple(m for m in "qkvo" if any(u.target == m for u in adapter.updates)),
        encoders=tuple(t for t in ("text", "vision") if any(u.tower == t for u in adapter.updates)),
    )


def check_fits(adapter: LoraAdapter, model: nn.Module, matrices: Sequence[str], max_rank: int, what: str,
               towers: Sequence[Tower] = ("vision",)) -> None:
    """Refuse, naming the reason, an adapter this bank cannot hold exactly. `towers`: those
    the bank serves with branches (the text tower too with open vocabulary); without it an
    adapter's text updates live only in its class embeddings, on any matrix."""
    if not adapter.updates:
        raise InvalidArgument(f"{what} updates nothing")
    for update in adapter.updates:
        if update.rank > max_rank:
            raise InvalidArgument(f"{what} has rank {update.rank} ({update.name}), above the bank's --max-rank "
                                  f"{max_rank}: create a bank with --max-rank {update.rank} or more for it")
        if update.tower in towers and update.target not in matrices:
            served = " (a bank with open vocabulary holds them in both towers)" if update.tower == "text" else ""
            raise InvalidArgument(f"{what} updates {update.name}, a matrix the bank does not hold (its --matrices are "
                                  f"{','.join(matrices)}{served}): create a bank with --matrices "
                                  f"{','.join(sorted({*matrices, update.target}, key='qkvo'.index))} for it")
        check_shapes(update, target_weight(model, update.tower, update.block, update.target))
        for factor, values in (("A", update.a), ("B", update.b)):
            if not torch.isfinite(values).all():
                raise InvalidArgument(f"{what}: the {factor} factor of {update.name} holds a value that is not finite")
        if not torch.isfinite(update.b * update.scale).all():
            raise InvalidArgument(f"{what}: scale {update.scale:g} times the B factor of {update.name} is not finite")


STACK_NAMES = {"vision": stack_name, "text": text_stack_name}  # a tower's stacks, by (block, matrix, factor)


def slot_factors(adapter: LoraAdapter | None, model: nn.Module, matrices: Sequence[str], max_rank: int,
                 towers: Sequence[Tower] = ("vision",)) -> dict[str, np.ndarray]:
    """One slot of every stack of `towers` (`cliplora.model.bank_graph.stack_name`,
    `cliplora.model.bank_text_graph.text_stack_name`): the adapter's updates of those
    towers, padded to `max_rank`, zeros elsewhere; call `check_fits` first."""
    slot: dict[str, np.ndarray] = {}
    for tower in towers:
        name = STACK_NAMES[tower]
        for block, module in enumerate(tower_blocks(model, tower)):
            width = module.attn.embed_dim
            for m in matrices:
                slot[name(block, m, "a")] = np.zeros((max_rank, width), dtype=np.float32)
                slot[name(block, m, "b")] = np.zeros((width, max_rank), dtype=np.float32)
    for update in adapter.updates if adapter else ():
        if update.tower not in towers:
            continue
        r, name = update.rank, STACK_NAMES[update.tower]
        slot[name(update.block, update.target, "a")][:r] = update.a.float().numpy()
        slot[name(update.block, update.target, "b")][:, :r] = (update.b.float() * update.scale).numpy()
    return slot


def text_only(adapter: LoraAdapter | None) -> LoraAdapter | None:
    """The adapter's text updates alone (None when it has none): what its class embeddings need."""
    if adapter is None:
        return None
    updates = tuple(u for u in adapter.updates if u.tower == "text")
    return replace(adapter, updates=updates) if updates else None


def _changed_weight(model: nn.Module, update: LoraUpdate) -> nn.Parameter:
    """The parameter an update's merge writes into (the packed q/k/v one, or the output's)."""
    attention = attention_module(model, update.tower, update.block)
    return attention.out_proj.weight if update.target == "o" else attention.in_proj_weight


def _text_copy(model: nn.Module, adapter: LoraAdapter) -> nn.Module:
    """A copy of a CLIP without its image tower (deepcopy's memo makes it None) that copies
    only the weights `adapter`'s merge writes and shares every other tensor with `model`:
    what a text-side merge needs, without copying the text tower (its token embedding alone
    is 100 MB for CLIP)."""
    changed = {id(_changed_weight(model, update)) for update in adapter.updates}
    shared = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in changed}
    return copy.deepcopy(model, memo={**shared, id(model.visual): None})


@torch.no_grad()
def class_embeddings(model: nn.Module, adapter: LoraAdapter | None, tokenizer: object, classes: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """Unit class embeddings [C, D] from `adapter`'s adapted text tower (the base's without
    text updates), on the prompts' own length (`cliplora.model.prompt_length`)."""
    if not classes:
        return np.zeros((0, int(model.text_projection.shape[1])), dtype=np.float32)
    text = text_only(adapter)
    encoder = model
    if text:
        encoder = _text_copy(model, text)
        merge_into(encoder, text)
    tokens = head.prompt_tokens(tokenizer, classes, templates)  # type: ignore[arg-type]
    return prompt_length.text_matrix(encoder, tokens, len(classes)).t().contiguous().numpy()
