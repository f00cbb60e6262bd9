"""`--lora`: which adapter format a path holds, and reading it into a `LoraAdapter`.

``none`` is no adapter; a folder (or one of its files) with ``adapter_config.json`` is a
PEFT adapter (`cliplora.model.lora_peft`); any other file is a CLIP-LoRA checkpoint in the
paper's format (`cliplora.model.lora_paper`). The formats share their types through
`cliplora.model.lora`, which imports neither of them.
"""

from __future__ import annotations

from pathlib import Path

from cliplora.core.errors import NotFound
from cliplora.model.lora import LoraAdapter
from cliplora.model.lora_paper import load_clip_lora_checkpoint
from cliplora.model.lora_peft import CONFIG_FILE, WEIGHT_FILES, load_peft_adapter

NO_ADAPTER = "none"


def load_adapter(spec: str, text_blocks: int, vision_blocks: int) -> LoraAdapter | None:
    """Read `--lora`: ``none``, a PEFT adapter folder, or a CLIP-LoRA checkpoint file.

    `text_blocks` and `vision_blocks` (the base model's tower depths) resolve the paper
    format's named positions; a PEFT adapter names its blocks itself."""
    if spec == NO_ADAPTER:
        return None
    path = Path(spec)
    if not path.exists():
        raise NotFound(f"LoRA adapter not found: {path} (pass 'none' to export the base model)")
    if path.is_dir() or path.name in (CONFIG_FILE, *WEIGHT_FILES):
        return load_peft_adapter(path if path.is_dir() else path.parent)
    return load_clip_lora_checkpoint(path, text_blocks=text_blocks, vision_blocks=vision_blocks)
