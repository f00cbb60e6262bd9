"""What `cliplora finetune` takes, checked: `FinetuneOptions` and its `LoraSpec`.

The defaults are the CLIP-LoRA paper's (finetune/train.py says where each comes from);
`cliplora.finetune.cli` declares the command's flags from them. No torch here, so the
command line starts without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cliplora.core.errors import InvalidArgument
from cliplora.core.preprocess import ORIENTATIONS
from cliplora.model.lora_targets import ENCODERS, TARGETS, Target, Tower

ITERATIONS_PER_SHOT = 500
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class LoraSpec:
    """Where the adapter goes and its hyper-parameters (the paper's flags)."""

    encoder: str = "both"
    position: str = "all"
    params: tuple[Target, ...] = ("q", "k", "v")
    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise InvalidArgument(f"--encoder must be text, vision or both, got {self.encoder!r}")
        if not self.params or any(p not in TARGETS for p in self.params) or len(set(self.params)) != len(self.params):
            raise InvalidArgument(f"--params must be distinct letters of q, k, v, o, got {''.join(self.params)!r}")
        if self.r < 1:
            raise InvalidArgument(f"--r must be at least 1, got {self.r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InvalidArgument(f"--alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise InvalidArgument(f"--dropout must be in [0, 1), got {self.dropout}")

    @property
    def ordered_params(self) -> list[Target]:
        return [t for t in TARGETS if t in self.params]

    def adapts(self, tower: Tower) -> bool:
        return tower in ENCODERS[self.encoder]

    def metadata(self) -> dict[str, Any]:
        """The checkpoint's ``metadata``, as the paper's ``save_lora`` writes it."""
        return {"r": self.r, "alpha": self.alpha, "encoder": self.encoder,
                "params": self.ordered_params, "position": self.position}


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything `cliplora finetune` takes; defaults are the paper's."""

    model: str
    pretrained: str | None
    data: Path
    shots: int
    output: Path
    eval_data: Path | None = None
    seed: int = 1
    lora: LoraSpec = field(default_factory=LoraSpec)
    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    min_lr: float = 1e-6
    iterations: int | None = None  # None: 500 × shots
    batch_size: int = 32
    templates: tuple[str, ...] = ()
    device: str = "auto"
    allow_random_weights: bool = False
    resume: bool = False
    save_every: int = 100
    exif_orientation: str = "apply"  # apply: photos upright as people see them; ignore: open_clip's pixel order

    def __post_init__(self) -> None:
        if self.iterations is not None and self.iterations < 1:
            raise InvalidArgument(f"--iterations must be at least 1, got {self.iterations}")
        if self.batch_size < 1:
            raise InvalidArgument(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.min_lr < 0 or self.weight_decay < 0:
            raise InvalidArgument("--lr must be positive; --min-lr and --weight-decay not negative")
        if self.device not in DEVICES:
            raise InvalidArgument(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.exif_orientation not in ORIENTATIONS:
            raise InvalidArgument(f"--exif-orientation must be apply or ignore, got {self.exif_orientation!r}")
        if self.save_every < 1:
            raise InvalidArgument(f"--save-every must be at least 1, got {self.save_every}")

    @property
    def total_iterations(self) -> int:
        return self.iterations if self.iterations is not None else ITERATIONS_PER_SHOT * self.shots

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        record = json.loads(json.dumps(asdict(self), default=str))
        for key in ("output", "resume", "save_every", "device"):
            record.pop(key)
        record["iterations"] = self.total_iterations
        return record
