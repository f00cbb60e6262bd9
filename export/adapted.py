"""The export's models: the base, the merged model, the unmerged reference, and the class
head each of them folds.

The merged model is what is exported; the unmerged reference (``x·Wᵀ + s·x·Aᵀ·Bᵀ``, the
adapter kept as branches) is what it is verified against; the base shows the adapter
changed something (`cliplora.export.verify`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cliplora.core.manifest import MergeRecord
from cliplora.core.progress import Progress
from cliplora.model import head
from cliplora.model.adapters import load_adapter
from cliplora.model.base_model import BaseModel
from cliplora.model.lora import LoraAdapter
from cliplora.model.merge import MergeReport, merge_adapter
from cliplora.model.reference import build_reference


@dataclass(frozen=True)
class AdaptedModels:
    """The base model and what the adapter makes of it."""

    base: BaseModel
    adapter: LoraAdapter | None  # None: `--lora none`
    merged: nn.Module  # W' = W + s·B·A; the base model itself without an adapter
    merge_report: MergeReport | None
    reference: nn.Module  # the adapter unmerged, as branches beside W

    def merge_record(self, unmerged: bool) -> MergeRecord:
        """How the exported graph holds the adapter: ``unmerged`` (`--unmerged`), ``merged`` or ``base``."""
        mode = "unmerged" if unmerged else ("merged" if self.adapter else "base")
        return self.merge_report.record(mode) if self.merge_report else MergeRecord(mode=mode)

    def exported_visual(self, unmerged: bool) -> nn.Module:
        """The image tower that goes into the classifier graph."""
        return self.reference.visual if unmerged else self.merged.visual


@dataclass(frozen=True)
class FoldedHeads:
    """The class head T [D, C] as each text encoder computes it, from one tokenisation."""

    merged: torch.Tensor  # what the graph folds in
    reference: torch.Tensor  # the unmerged reference's, for verification
    base: torch.Tensor | None  # the base model's (None without an adapter)


def adapt(lora: str, base: BaseModel, progress: Progress) -> AdaptedModels:
    """Read `--lora`, merge it into a copy of the base model, build the unmerged reference."""
    with progress.step(f"reading adapter {lora}"):
        adapter = load_adapter(lora, len(base.text_blocks), len(base.vision_blocks))
    if adapter is None:
        return AdaptedModels(base, None, base.model, None, build_reference(base.model, None))
    progress.info(f"{adapter.format}: {len(adapter.updates)} updates, r={adapter.rank}, "
                  f"alpha={adapter.alpha:g}, scale {adapter.scaling}")
    with progress.step("merging W' = W + s·B·A (fp32)"):
        merged, report = merge_adapter(base.model, adapter)
    return AdaptedModels(base, adapter, merged, report, build_reference(base.model, adapter))


@torch.no_grad()
def fold_heads(models: AdaptedModels, classes: Sequence[str], templates: Sequence[str],
               progress: Progress) -> FoldedHeads:
    """Every prompt encoded by the adapted text encoder (and by the reference's and the base's)."""
    base = models.base
    with progress.step(f"encoding {len(classes) * len(templates)} prompts with the adapted text encoder"):
        tokens = head.prompt_tokens(base.tokenizer, classes, templates)
        return FoldedHeads(
            merged=head.text_matrix(models.merged, tokens, len(classes)),
            reference=head.text_matrix(models.reference, tokens, len(classes)),
            base=head.text_matrix(base.model, tokens, len(classes)) if models.adapter else None,
        )
