"""``manifest.json``: the provenance and verification of one published model version.

Written once by `cliplora export` (`cliplora.export.pipeline`), read by the gateway
(ListModels, the ``cliplora_gateway_model_info`` metric that pairs a LoRA model with
its base in the alert rules), `cliplora predict` and `cliplora evaluate` (the precision
a session is opened with). Every field keeps the name and meaning it had before the
record was typed; `tests/data/manifests/` holds files written before, which still load.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from cliplora.core.records import Record, VersionedRecord


class WeightsRecord(Record):
    """Where the base weights came from."""

    kind: Literal["tag", "file", "torchscript", "random"]
    source: str  # the tag, the path, or "random"
    sha256: str | None
    seed: int | None = None  # random weights only
    warning: str | None = None  # random weights only


class PreprocessRecord(Record):
    image_size: int
    resize: str
    mean: list[float]
    std: list[float]


def weights_id(weights: WeightsRecord) -> str:
    """A short name for base weights (their sha256 prefix, else their source): what
    ``cliplora_gateway_model_info`` pairs models by."""
    return str(weights.sha256 or weights.source)[:16]


class BaseRecord(Record):
    """The base CLIP model (also in finetune's run record)."""

    model: str
    weights: WeightsRecord
    activation: Literal["quick_gelu", "gelu"]
    logit_scale: float
    text_blocks: int
    vision_blocks: int
    preprocess: PreprocessRecord


class NoLoraRecord(Record):
    """`--lora none`: the base model itself."""

    format: Literal["none"]


class _AdapterRecord(Record):
    source: str
    sha256: str
    r: int
    alpha: float
    scaling: str  # how the scale was derived: "alpha/sqrt(r)", "lora_alpha/r", ...
    scale: float | list[float]  # one scale, or every distinct one (PEFT patterns)
    updates: int
    targets: dict[str, dict[str, list[int]]]  # {tower: {target: [blocks]}}


class PaperLoraRecord(_AdapterRecord):
    """A CLIP-LoRA paper checkpoint (`save_lora`)."""

    format: Literal["clip-lora"]
    encoder: Literal["text", "vision", "both"]
    params: list[str]
    position: str


class PeftLoraRecord(_AdapterRecord):
    """A PEFT LoRA folder for Hugging Face CLIP."""

    format: Literal["peft"]
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, int | float]
    base_model_name_or_path: str | None


LoraRecord = Annotated[NoLoraRecord | PaperLoraRecord | PeftLoraRecord, Field(discriminator="format")]


class MergeRecord(Record):
    mode: Literal["base", "merged", "unmerged"]
    updates: int | None = None
    max_abs_delta_weight: float | None = None
    delta_weight_norm: float | None = None


class GpuServingRecord(Record):
    """`--target gpu`: what the TensorRT FP16 engine (built on the GPU server) may differ by."""

    engine: str
    engine_precision: str
    expected_tolerance_abs_logit: float
    verified_here: bool


class TensorRecord(Record):
    name: str
    dtype: str  # KServe v2 datatype name
    shape: list[int]  # -1: the dynamic batch dimension


class TensorsRecord(Record):
    input: TensorRecord
    output: TensorRecord
    embeddings: TensorRecord | None = None  # `--open-vocabulary`: image_embeds


class OnnxRecord(Record):
    sha256: str
    bytes: int
    opset: int
    exporter: str
    onnxruntime_version: str
    tensorrt_engine_key: str | None = None  # `--target gpu` only


class ComparisonRecord(Record):
    max_abs_logit: float
    top1_agreement: float


class VerificationRecord(Record):
    probes: int
    precision: str
    tolerance_abs_logit: float
    onnx_vs_reference: ComparisonRecord
    merged_torch_vs_reference: ComparisonRecord | None
    onnx_vs_base: ComparisonRecord | None
    merged_vs_base: ComparisonRecord | None
    top1_consistent: bool
    passed: bool


class TokenizerRecord(Record):
    """The tokenizer whose ids the text encoder takes (the gateway's must be the same)."""

    kind: Literal["clip-bpe"]
    vocab: str  # the vocabulary file's name
    vocab_sha256: str
    vocab_size: int
    context_length: int


class EmbeddingComparisonRecord(Record):
    max_logit_error: float  # logit_scale · max ‖Δ‖: bounds the logit error for any unit partner
    max_abs: float
    min_cosine: float


class TextVerificationRecord(Record):
    """The text encoder (and image_embeds) against the unmerged reference."""

    precision: str
    tolerance_abs_logit: float
    strings: int  # the model's prompts and the probe strings
    text_vs_reference: EmbeddingComparisonRecord
    merged_torch_vs_reference: EmbeddingComparisonRecord
    text_vs_base: EmbeddingComparisonRecord | None  # how far the adapter moved the text embeddings
    image_embeds_vs_reference: EmbeddingComparisonRecord  # the published classifier's (INT8 for cpu-int8)
    image_label_logit_error: float  # its logits' error against the verified strings as labels
    image_embeds_tolerance_abs_logit: float  # on max_logit_error; for cpu-int8 on image_label_logit_error
    tokenizer_matches: bool  # the gateway's tokenizer gave open_clip's ids (else nothing is published)
    passed: bool


class OpenVocabularyRecord(Record):
    """`--open-vocabulary`: the text encoder published beside the classifier."""

    text_model: str
    tokenizer: TokenizerRecord
    embedding_dim: int
    logit_scale: float
    verification: TextVerificationRecord


class QuantizationGateRecord(Record):
    """`--target cpu-int8`: the INT8 graph against the fp32 graph of the same merged model."""

    images: int  # probe images plus calibration images
    calibration_images: int
    tolerance_abs_logit: float
    top1_agreement: float
    max_abs_logit: float
    mean_abs_logit: float
    min_top1_margin: float | None  # the smallest fp32 top-1 lead over the runner-up; None for one class
    min_top1_agreement: float | None  # the agreement bound, when enough images were compared
    passed: bool


class QuantizationRecord(Record):
    """How the INT8 graph was made (export/quantize.py) and its gate."""

    method: Literal["dynamic"]
    weight_type: str
    per_channel: bool
    op_types: list[str]
    constant_weights_only: bool
    excluded_nodes: list[str]  # kept fp32: the class head
    gate: QuantizationGateRecord | None


class EnvironmentRecord(Record):
    python: str
    torch: str


class Manifest(VersionedRecord):
    """One model version's ``manifest.json``."""

    kind: ClassVar[str] = "manifest"

    cliplora_version: str
    name: str
    version: int | None  # None only while staged: stamped under the publish lock
    created: str  # ISO 8601, UTC
    base: BaseRecord
    lora: LoraRecord
    merge: MergeRecord
    classes: list[str]
    templates: list[str]
    precision: str
    target: str
    gpu_serving: GpuServingRecord | None = None
    tensors: TensorsRecord
    onnx: OnnxRecord
    verification: VerificationRecord
    environment: EnvironmentRecord
    export_seconds: float
    open_vocabulary: OpenVocabularyRecord | None = None
    quantization: QuantizationRecord | None = None  # `--target cpu-int8`

    @property
    def base_weights_id(self) -> str:
        """A short name for the base weights: a LoRA model and its base share it."""
        return weights_id(self.base.weights)


class TextTensorsRecord(Record):
    input: TensorRecord
    output: TensorRecord


class TextEncoderManifest(VersionedRecord):
    """The ``manifest.json`` of a classifier's text encoder (``<name>_text``): what it is
    for and how it was checked; its provenance is the classifier's manifest."""

    kind: ClassVar[str] = "text encoder manifest"

    cliplora_version: str
    name: str
    classifier: str  # the model this text encoder belongs to (same version numbers)
    version: int | None  # None only while staged
    created: str
    precision: str
    target: str
    tokenizer: TokenizerRecord
    embedding_dim: int
    tensors: TextTensorsRecord
    onnx: OnnxRecord
    verification: TextVerificationRecord
