"""The adapter, format-independent: a list of low-rank updates of attention projections.

Every format (the CLIP-LoRA paper's checkpoints, `cliplora.model.lora_paper`; PEFT
folders, `cliplora.model.lora_peft`) is read into a `LoraAdapter`
(`cliplora.model.adapters.load_adapter` picks the format); the merge, the unmerged
reference and the manifest only see this. This module knows no format, so the formats
import it and nothing here imports them back.
An update of target ``q``/``k``/``v`` in block ``i`` of a tower changes the rows
``[0:d]``/``[d:2d]``/``[2d:3d]`` of that block's ``attn.in_proj_weight``; target ``o``
changes ``attn.out_proj.weight``. The update is ``ΔW = scale · B @ A`` with
``A: [r, d_in]`` and ``B: [d_out, r]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cliplora.core.errors import InvalidArgument
from cliplora.core.manifest import PaperLoraRecord, PeftLoraRecord
from cliplora.model.lora_targets import TARGETS, TOWERS, Target, Tower

__all__ = ["TARGETS", "TOWERS", "LoraAdapter", "LoraUpdate", "Target", "Tower", "to_fp32_matrix"]


@dataclass(frozen=True)
class LoraUpdate:
    """One low-rank update ΔW = scale · B @ A of one projection."""

    tower: Tower
    block: int
    target: Target
    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scale: float

    @property
    def name(self) -> str:
        return f"{self.tower} block {self.block} {self.target}"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """ΔW in fp32 (float64 products would hide nothing fp32 can show)."""
        return (self.b.float() @ self.a.float()) * self.scale


@dataclass(frozen=True)
class LoraAdapter:
    """A whole adapter and its provenance."""

    format: str  # "clip-lora" | "peft"
    source: str
    sha256: str
    rank: int
    alpha: float
    scaling: str  # how scale was derived, e.g. "alpha/sqrt(r)"
    updates: tuple[LoraUpdate, ...]
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[tuple[str, int, str]] = set()
        for update in self.updates:
            key = (update.tower, update.block, update.target)
            if key in seen:
                raise InvalidArgument(f"adapter {self.source} updates {update.name} twice")
            seen.add(key)

    @property
    def targets(self) -> dict[str, dict[str, list[int]]]:
        """{tower: {target: [blocks]}} of what the adapter changes."""
        found: dict[str, dict[str, list[int]]] = {}
        for u in self.updates:
            found.setdefault(u.tower, {}).setdefault(u.target, []).append(u.block)
        return {t: {k: sorted(v) for k, v in sorted(d.items())} for t, d in sorted(found.items())}

    def record(self) -> PaperLoraRecord | PeftLoraRecord:
        """The adapter's part of the manifest; `details` holds the format's own fields."""
        scales = sorted({u.scale for u in self.updates})
        kind = PaperLoraRecord if self.format == "clip-lora" else PeftLoraRecord
        return kind(
            format=self.format,
            source=self.source,
            sha256=self.sha256,
            r=self.rank,
            alpha=self.alpha,
            scaling=self.scaling,
            scale=scales[0] if len(scales) == 1 else scales,
            updates=len(self.updates),
            targets=self.targets,
            **self.details,
        )


def to_fp32_matrix(value: Any, what: str) -> torch.Tensor:
    """A 2-D floating tensor as fp32, or a clear error naming `what`."""
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument(f"{what} is not a tensor but {type(value).__name__}")
    if value.ndim != 2 or not value.is_floating_point():
        raise InvalidArgument(f"{what} must be a 2-D floating tensor, got {value.dtype} {tuple(value.shape)}")
    return value.detach().to(torch.float32).contiguous()

