"""Where an adapter goes: the towers, the attention projections, and the CLIP-LoRA paper's
names for sets of blocks (``encoder`` and ``position``).

No torch here: `cliplora finetune`'s flags are declared from these tables, and the
command line must start without importing torch (`cliplora serve` runs where there is none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from cliplora.core.errors import InvalidArgument

Tower = Literal["text", "vision"]
Target = Literal["q", "k", "v", "o"]
TOWERS: tuple[Tower, ...] = ("text", "vision")
TARGETS: tuple[Target, ...] = ("q", "k", "v", "o")  # q/k/v: rows of in_proj_weight; o: out_proj
ENCODERS: dict[str, tuple[Tower, ...]] = {"text": ("text",), "vision": ("vision",), "both": ("text", "vision")}
POSITIONS = ("all", "bottom", "mid", "up", "half-up", "half-bottom", "top", "top1", "top2", "top3")
_TOPS = {"top": 1, "top1": 1, "top2": 2, "top3": 3}


def block_indices(position: str, n_blocks: int) -> list[int]:
    """The blocks a ``position`` names in a tower of `n_blocks` blocks.

    For the paper's 12-block towers (ViT-B/16, ViT-B/32, and every CLIP text tower):
    all = 0..11, bottom = 0..3, mid = 4..7, up = 8..11, half-up = 6..11,
    half-bottom = 0..5, top3 = 9..11, top2 = 10..11, top1 = top = 11. ViT-L/14's
    24-block vision tower: all, half-up = 12..23, half-bottom = 0..11. The same rules
    (quarters are thirds of the tower, halves are halves) extend to any block count
    that divides evenly; otherwise the position is refused rather than guessed.
    """
    n = n_blocks
    if position == "all":
        return list(range(n))
    if position in ("half-up", "half-bottom"):
        if n % 2:
            raise InvalidArgument(f"position {position!r} needs an even block count; this tower has {n}")
        return list(range(n // 2, n)) if position == "half-up" else list(range(n // 2))
    if position in ("bottom", "mid", "up"):
        if n % 3:
            raise InvalidArgument(f"position {position!r} needs a block count divisible by 3; this tower has {n}")
        third = n // 3
        start = {"bottom": 0, "mid": third, "up": 2 * third}[position]
        return list(range(start, start + third))
    if position in _TOPS:
        if _TOPS[position] > n:
            raise InvalidArgument(f"position {position!r} needs {_TOPS[position]} blocks; this tower has {n}")
        return list(range(n - _TOPS[position], n))
    raise InvalidArgument(f"unknown LoRA position {position!r}; known: {', '.join(POSITIONS)}")


def adapted_blocks(encoder: str, position: str, tower_sizes: Mapping[Tower, int]) -> list[tuple[Tower, int]]:
    """The (tower, block) pairs an adapter adapts, in ``layer_i`` order: the text tower's
    blocks first, then the vision tower's, each by increasing index."""
    return [(tower, i) for tower in ENCODERS[encoder] for i in block_indices(position, tower_sizes[tower])]
