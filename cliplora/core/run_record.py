"""``run.json``: what one `cliplora finetune` run did, and how to export its adapter.

Written by `cliplora.finetune.train` (when the run stops, and again when it is done),
read by the command line's summary and by whoever publishes the adapter (``export``
holds the exact `cliplora export` command). The accuracy figures are those of
`cliplora.core.accuracy`, which `cliplora evaluate` reports for the published model.
`tests/data/runs/` holds records written before the record was typed; they still load.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from cliplora.core.manifest import BaseRecord
from cliplora.core.records import Record, VersionedRecord


class LoraSpecRecord(Record):
    encoder: Literal["text", "vision", "both"]
    position: str
    params: list[str]
    r: int
    alpha: float
    dropout: float


class FinetuneOptionsRecord(Record):
    """The run's settings (``--resume`` refuses other ones), where it wrote, on which device."""

    model: str
    pretrained: str | None
    data: str
    shots: int
    eval_data: str | None
    seed: int
    lora: LoraSpecRecord
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    min_lr: float
    iterations: int
    batch_size: int
    templates: list[str]
    allow_random_weights: bool
    output: str
    device: str
    exif_orientation: Literal["apply", "ignore"] = "apply"  # absent in records written before it existed


class DataRecord(Record):
    source: str
    classes: list[str]
    train_images: int
    eval_source: str
    eval_images: int


class ClassAccuracy(Record):
    images: int
    correct: int
    top1: float


class AccuracyRecord(Record):
    """`cliplora.core.accuracy.accuracy_report`'s figures."""

    images: int
    correct: int
    top1: float
    per_class: dict[str, ClassAccuracy]


class CheckpointRecord(Record):
    path: str
    sha256: str


class RunRecord(VersionedRecord):
    """One finetune run's ``run.json``."""

    kind: ClassVar[str] = "finetune run record"

    cliplora_version: str
    options: FinetuneOptionsRecord
    base: BaseRecord
    data: DataRecord
    templates: list[str]
    iterations: int
    steps_done: int
    training_seconds_this_session: float
    losses: list[float]
    zero_shot: AccuracyRecord | None
    status: Literal["stopped", "done"]
    # When done:
    accuracy: AccuracyRecord | None = None
    checkpoint: CheckpointRecord | None = None
    finished: str | None = None  # ISO 8601, UTC
    total_seconds_this_session: float | None = None
    export: str | None = None  # the `cliplora export` command that publishes the adapter
