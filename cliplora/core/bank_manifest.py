"""The ``manifest.json`` of an adapter bank's version and of its companion (`NAME_adapters`).

A bank version's manifest is the whole state of the bank: what `bank create` loaded (so
that `bank add` reloads the same base without being told), the bank's settings, its files,
and every slot ever given out: the live adapters with their provenance and their
verification inside the bank, and the slots of removed or replaced adapters (never given
out again). `bank add`/`remove` read the latest version's manifest and write the next one.
A bank with open vocabulary records its text encoder (``NAME_text``) here too: its files,
and each slot's check of it; ``NAME_text``'s own manifest (`BankTextManifest`) says only
what it is and which files it reads.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from cliplora.core import contract
from cliplora.core.manifest import (
    BaseRecord,
    ComparisonRecord,
    EmbeddingComparisonRecord,
    EnvironmentRecord,
    GpuServingRecord,
    LoraRecord,
    QuantizationGateRecord,
    QuantizationRecord,
    TokenizerRecord,
)
from cliplora.core.records import Record, VersionedRecord


class BankBaseRecord(Record):
    """What `bank create` loaded: `bank add` loads it again from here, and refuses if it changed."""

    model: str  # --model as given (an absolute path for a JSON model config)
    model_config_sha256: str | None  # a JSON model config's content hash
    pretrained: str | None  # --pretrained as given (an absolute path for a file)
    allow_random_weights: bool
    base: BaseRecord  # the model name, weights source + sha256, activation, logit scale, preprocessing


class BankSettingsRecord(Record):
    """What `bank create` fixed for the bank's life (its config.pbtxt says the same)."""

    max_rank: int
    matrices: list[str]  # vision-tower matrices with a branch in every block
    target: Literal["portable", "gpu", "cpu-int8"]
    precision: Literal["fp32", "int8"]  # of the base weights; the branches are always fp32
    max_batch_size: int
    image_size: int
    embedding_dim: int
    logit_scale: float
    vision_blocks: int
    open_vocabulary: bool = False  # each adapter's text tower served as NAME_text, with the same matrices and rank
    tokenizer: TokenizerRecord | None = None  # open vocabulary: the ids NAME_text takes (the config names the vocabulary)

    @property
    def towers(self) -> tuple[Literal["vision", "text"], ...]:
        """The towers the bank serves with per-adapter branches."""
        return ("vision", "text") if self.open_vocabulary else ("vision",)


class BankTextFilesRecord(Record):
    """A version's text encoder files (``NAME_text``), laid out as the bank's: the graph, the
    base weights (the same file in every version, hard-linked), this version's factors.
    Always fp32, also in a cpu-int8 bank (as an export's text encoder)."""

    model_sha256: str
    base_weights_sha256: str
    base_weights_bytes: int
    factors_sha256: str
    factors_bytes: int
    text_blocks: int
    tensorrt_engine_key: str | None = None  # `--target gpu`: carried by the first text stack's name


class BankTextVerificationRecord(Record):
    """One slot of a staged ``NAME_text`` checked before it is published: an adapter's at
    `bank add`, the base's at `bank create`. Errors are logit-error bounds (logit_scale x
    max |Δ text embedding|: the error of any logit those texts give, for any image)."""

    strings: int  # the slot's own prompts (classes x templates) and the probe strings
    tolerance_abs_logit: float  # the export's
    text_vs_reference: EmbeddingComparisonRecord  # the slot (ONNX, our tokenizer's ids) vs the unmerged reference
    text_updates: bool  # the adapter updates the text tower
    text_vs_base: EmbeddingComparisonRecord | None  # the slot vs slot 0: beyond the tolerance iff text_updates
    mixed_batch_max_logit_error: float | None  # prompts of every new slot and the base in one batch vs alone
    tokenizer_matches: bool  # the gateway's tokenizer gives open_clip's ids for every string checked
    passed: bool


class BankFilesRecord(Record):
    """The version's files (docs/architecture.md, "Adapter banks")."""

    model_sha256: str  # model.onnx: the graph, its large weights outside
    base_weights_sha256: str  # identical in every version (hard links)
    base_weights_bytes: int
    factors_sha256: str
    factors_bytes: int
    slots: int  # K: the stacks' first dimension
    opset: int
    exporter: str
    onnxruntime_version: str
    tensorrt_engine_key: str | None = None  # `--target gpu`: carried by the first stack's name
    fp32_base_weights_sha256: str | None = None  # cpu-int8: the fp32 bank's base weights (its INT8 gate's)
    text: BankTextFilesRecord | None = None  # open vocabulary: NAME_text's files at this version


class AdapterVerificationRecord(Record):
    """One adapter checked inside the bank version that added it."""

    probes: int
    tolerance_abs_logit: float
    bank_vs_reference: ComparisonRecord  # the bank's slot (ONNX) and class embeddings vs the unmerged reference
    bank_vs_base: ComparisonRecord  # how far the adapter moves the base's logits (must exceed the tolerance)
    mixed_batch_max_abs_logit: float  # a batch mixing slots vs the same samples in one-slot batches
    top1_consistent: bool
    int8_gate: QuantizationGateRecord | None = None  # cpu-int8: the INT8 bank's slot vs the fp32 bank's
    passed: bool
    text: BankTextVerificationRecord | None = None  # open vocabulary: its slot of NAME_text


class BaseVerificationRecord(Record):
    """The bank's slot 0 checked at `bank create` against the base model's reference."""

    probes: int
    tolerance_abs_logit: float
    embeds_logit_error: float  # logit_scale x max |image_embeds - reference|: bounds the logit error for any class
    bank_vs_reference: ComparisonRecord | None  # with the base's classes, when it has some
    int8_gate: QuantizationGateRecord | None = None  # cpu-int8: on the bound above, the INT8 bank vs the fp32 bank
    passed: bool
    text: BankTextVerificationRecord | None = None  # open vocabulary: slot 0 of NAME_text


class BankAdapterRecord(Record):
    """One live adapter of a bank version (the base is slot 0, adapter `base`)."""

    adapter: str
    slot: int
    version_added: int
    classes: list[str]
    templates: list[str]
    lora: LoraRecord | None  # None for the base
    rank: int  # its largest update rank, before padding; 0 for the base
    matrices: list[str]  # the projections it updates, both towers
    encoders: list[str]  # the towers it updates
    verification: AdapterVerificationRecord | None  # None for the base

    @property
    def lora_sha256(self) -> str:
        return self.lora.sha256 if self.lora is not None and self.lora.format != "none" else ""

    def row(self) -> dict[str, object]:
        """Its row of the adapter table (`cliplora.core.contract.AdapterRow`, the companion's JSON)."""
        return {"adapter": self.adapter, "slot": self.slot, "num_classes": len(self.classes), "rank": self.rank,
                "matrices": self.matrices, "encoders": self.encoders, "lora_sha256": self.lora_sha256,
                "version_added": self.version_added, "templates": self.templates}

    def listing(self) -> dict[str, object]:
        """Its entry in `cliplora bank list` (the README's "Banks")."""
        return {"adapter": self.adapter, "num_classes": len(self.classes), "rank": self.rank,
                "matrices": self.matrices, "lora_sha256": self.lora_sha256, "version_added": self.version_added}


class RetiredSlotRecord(Record):
    """A slot whose adapter was removed or replaced: all zeros from then on, never given out again."""

    slot: int
    adapter: str
    lora_sha256: str
    version_retired: int


class BankManifest(VersionedRecord):
    """One bank version's ``manifest.json``."""

    kind: ClassVar[str] = "bank manifest"

    model_kind: Literal["bank"] = contract.KIND_BANK
    cliplora_version: str
    name: str
    version: int | None  # None only while staged
    created: str  # ISO 8601, UTC
    change: str  # what made this version: "create", "add a, b", "remove a"
    source: BankBaseRecord
    settings: BankSettingsRecord
    adapters: list[BankAdapterRecord]  # slot order, the base first
    retired: list[RetiredSlotRecord]
    files: BankFilesRecord
    base_verification: BaseVerificationRecord  # from `bank create`, carried by every version
    quantization: QuantizationRecord | None = None  # cpu-int8: how the base weights were quantized
    gpu_serving: GpuServingRecord | None = None
    environment: EnvironmentRecord
    seconds: float

    @property
    def next_slot(self) -> int:
        used = [a.slot for a in self.adapters] + [r.slot for r in self.retired]
        return max(used) + 1

    def adapter(self, adapter_id: str) -> BankAdapterRecord | None:
        return next((a for a in self.adapters if a.adapter == adapter_id), None)


class AdapterTableManifest(VersionedRecord):
    """The ``manifest.json`` of a bank's companion (`NAME_adapters`): what it belongs to and
    what it holds; the provenance is the bank version's manifest."""

    kind: ClassVar[str] = "adapter table manifest"

    cliplora_version: str
    name: str
    bank: str
    version: int | None
    created: str
    adapters: int  # rows of the table
    slots: int  # K
    max_classes: int  # C: the class_embeds/class_names rows of this version
    embedding_dim: int
    model_sha256: str


class BankTextManifest(VersionedRecord):
    """The ``manifest.json`` of a bank's text encoder (``NAME_text``, open vocabulary): what it
    belongs to and the files it reads; its provenance and checks are in the bank version's
    manifest (`BankFilesRecord.text`, each adapter's `AdapterVerificationRecord.text`)."""

    kind: ClassVar[str] = "bank text encoder manifest"

    model_kind: Literal["bank_text"] = "bank_text"
    cliplora_version: str
    name: str
    bank: str  # the bank it belongs to (same version numbers)
    version: int | None  # None only while staged
    created: str
    precision: Literal["fp32"] = "fp32"  # also beside a cpu-int8 bank
    tokenizer: TokenizerRecord
    embedding_dim: int
    slots: int  # K: the stacks' first dimension, the bank's
    files: BankTextFilesRecord
