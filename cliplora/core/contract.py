"""The tensor contract between the exporter, the Triton model config and the gateway.

A classifier is one graph: ``image`` (UINT8, ``[N, S, S, 3]``, RGB, already resized and
centre-cropped exactly as open_clip does) -> ``logits`` (FP32, ``[N, C]``,
``logit_scale * cos(image, class)``). Exported with ``--open-vocabulary``, the graph has a
second output, ``image_embeds`` (FP32 ``[N, D]``, L2-normalised: the features the head
uses), and a companion model ``<name>_text`` holds the adapted text encoder: ``tokens``
(INT32 ``[N, 77]``, open_clip's token ids) -> ``text_embeds`` (FP32 ``[N, D]``,
L2-normalised). Everything that names a tensor, a dtype, a shape or a model-config
parameter the gateway reads comes from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
INPUT_NUMPY_DTYPE = np.uint8
OUTPUT_NUMPY_DTYPE = np.float32
INPUT_TRITON_DTYPE = "TYPE_UINT8"
OUTPUT_TRITON_DTYPE = "TYPE_FP32"
INPUT_WIRE_DTYPE = "UINT8"  # KServe v2 datatype names
OUTPUT_WIRE_DTYPE = "FP32"
CHANNELS = 3
LABELS_FILENAME = "labels.txt"
MODEL_FILENAME = "model.onnx"
MANIFEST_FILENAME = "manifest.json"
CONFIG_FILENAME = "config.pbtxt"
PLATFORM = "onnxruntime_onnx"
DEFAULT_MAX_BATCH_SIZE = 32
PRECISIONS = ("fp32", "fp16")  # what an export's graph may compute in (`--target cpu-int8` makes int8 of fp32)

# Open vocabulary (`cliplora export --open-vocabulary`).
EMBEDS_NAME = "image_embeds"  # the classifier's second output
TEXT_INPUT_NAME = "tokens"
TEXT_OUTPUT_NAME = "text_embeds"
TEXT_INPUT_NUMPY_DTYPE = np.int32
TEXT_INPUT_TRITON_DTYPE = "TYPE_INT32"
TEXT_INPUT_WIRE_DTYPE = "INT32"
CONTEXT_LENGTH = 77  # CLIP's text context: start token, up to 75 BPE tokens, end token
TEXT_MODEL_SUFFIX = "_text"
# Model-config parameters that tell the gateway about the open-vocabulary part (Triton's
# ONNX Runtime backend ignores model parameters it does not know, so they stay portable).
PARAM_PRECISION = "precision"  # fp32 | fp16 | int8: the graph's, for the session options
PARAM_INTRA_OP_THREADS = "intra_op_thread_count"  # read by Triton's native ONNX Runtime backend and ours
PARAM_INTER_OP_THREADS = "inter_op_thread_count"  # likewise
PARAM_SPINNING = "allow_spinning"  # auto | on | off: ours only (the native backend has no such switch)
PARAM_TEXT_MODEL = "text_model"  # on the classifier: its text encoder's model name
PARAM_LOGIT_SCALE = "logit_scale"  # on the classifier: the model's exp(logit_scale)
PARAM_TEMPLATES = "templates"  # on the classifier: a JSON list, the export's prompt templates
PARAM_VOCAB_SHA256 = "tokenizer_vocab_sha256"  # on both: the BPE vocabulary the ids come from
PARAM_CLASSIFIER = "classifier"  # on the text encoder: the classifier it belongs to


def text_model_name(name: str) -> str:
    """The name of the text encoder that a classifier exported with ``--open-vocabulary`` reserves."""
    return f"{name}{TEXT_MODEL_SUFFIX}"


@dataclass(frozen=True)
class TensorSpec:
    """Shapes of one model's input and output, per item (the batch dimension is dynamic)."""

    image_size: int
    num_classes: int
    embedding_dim: int | None = None  # the image_embeds output's size; None without open vocabulary

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.num_classes < 1 or (self.embedding_dim is not None and self.embedding_dim < 1):
            raise ValueError(f"invalid tensor spec {self}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, CHANNELS)

    @property
    def output_shape(self) -> tuple[int]:
        return (self.num_classes,)


@dataclass(frozen=True)
class ClassifierShape:
    """What a classifier's Triton config says about its tensors."""

    image_size: int
    num_classes: int
    max_batch_size: int
    embedding_dim: int | None  # None: no image_embeds output (not exported for open vocabulary)


@dataclass(frozen=True)
class TextShape:
    """What a text encoder's Triton config says about its tensors."""

    context_length: int
    embedding_dim: int
    max_batch_size: int


def _tensors(config: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in config.get(kind, [])}


def _dims(tensor: dict[str, Any]) -> list[int]:
    return [int(d) for d in tensor.get("dims", [])]


def is_text_model(config: dict[str, Any]) -> bool:
    """True for a config with the text encoder's tensors (``tokens`` -> ``text_embeds``)."""
    return TEXT_INPUT_NAME in _tensors(config, "input") and TEXT_OUTPUT_NAME in _tensors(config, "output")


def classifier_shape(name: str, config: dict[str, Any]) -> ClassifierShape:
    """A classifier's shapes from its Triton config (JSON form), checked against the
    contract; `ValueError` for a model that does not follow it."""
    inputs, outputs = _tensors(config, "input"), _tensors(config, "output")
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ValueError(f"model {name} does not follow the cliplora tensor contract")
    dims, classes = _dims(inputs[INPUT_NAME]), _dims(outputs[OUTPUT_NAME])
    if len(dims) != 3 or dims[0] != dims[1] or dims[2] != CHANNELS or len(classes) != 1:
        raise ValueError(f"model {name} has input dims {dims} and output dims {classes}")
    embedding_dim = None
    if EMBEDS_NAME in outputs:
        embeds = _dims(outputs[EMBEDS_NAME])
        if len(embeds) != 1 or embeds[0] < 1:
            raise ValueError(f"model {name} has {EMBEDS_NAME} dims {embeds}")
        embedding_dim = embeds[0]
    return ClassifierShape(dims[0], classes[0], int(config.get("max_batch_size", 0)), embedding_dim)


def text_shape(name: str, config: dict[str, Any]) -> TextShape:
    """A text encoder's shapes from its Triton config (JSON form), checked against the contract."""
    inputs, outputs = _tensors(config, "input"), _tensors(config, "output")
    if TEXT_INPUT_NAME not in inputs or TEXT_OUTPUT_NAME not in outputs:
        raise ValueError(f"model {name} is not a cliplora text encoder")
    context, embeds = _dims(inputs[TEXT_INPUT_NAME]), _dims(outputs[TEXT_OUTPUT_NAME])
    if context != [CONTEXT_LENGTH] or len(embeds) != 1 or embeds[0] < 1:
        raise ValueError(f"text encoder {name} has input dims {context} and output dims {embeds}")
    return TextShape(context[0], embeds[0], int(config.get("max_batch_size", 0)))


def parameter(config: dict[str, Any], key: str) -> str | None:
    """A model-config parameter's string value (JSON form of the config), or None."""
    value = config.get("parameters", {}).get(key)
    return None if value is None else str(value.get("string_value", ""))


# Adapter banks (`cliplora bank`, docs/architecture.md "Adapter banks"). A bank `NAME` is one
# model: ``image`` UINT8 [S, S, 3] and ``adapter`` INT32 [1] (the adapter's slot) per sample ->
# ``image_embeds`` FP32 [D] (L2-normalised). Its companion `NAME_adapters` (same version
# numbers, published in the same step) answers, for one ``adapter`` slot INT32 [1] (no batch
# dimension), that adapter's ``class_embeds`` FP32 [C, D] (unit rows; C is the version's
# largest class count, rows past the adapter's ``class_count`` INT32 [1] are zero),
# ``class_names`` BYTES [C] (UTF-8, empty past the count) and ``adapters`` BYTES [1]: the
# version's adapter table as JSON (`read_adapter_table`), the same for any slot.
BANK_ADAPTER_NAME = "adapter"  # the bank's second input, and the companion's only input
BANK_ADAPTER_NUMPY_DTYPE = np.int32
BANK_ADAPTER_TRITON_DTYPE = "TYPE_INT32"
BANK_ADAPTER_WIRE_DTYPE = "INT32"
BANK_OUTPUT_NAME = EMBEDS_NAME  # the bank's only output
BASE_ADAPTER = "base"  # the reserved adapter id: the base model, slot 0, always in the table
BASE_SLOT = 0
ADAPTERS_MODEL_SUFFIX = "_adapters"
CLASS_EMBEDS_NAME = "class_embeds"
CLASS_COUNT_NAME = "class_count"
CLASS_NAMES_NAME = "class_names"
ADAPTER_TABLE_NAME = "adapters"
CLASS_COUNT_NUMPY_DTYPE = np.int32
STRING_TRITON_DTYPE = "TYPE_STRING"  # what a config declares for a BYTES tensor
STRING_WIRE_DTYPE = "BYTES"
BANK_BASE_WEIGHTS_FILENAME = "base_weights.bin"  # ONNX external data, one file for every version (hard links)
BANK_FACTORS_FILENAME = "adapter_factors.bin"  # ONNX external data: this version's stacked LoRA factors
# Config parameters of a bank and its companion (the gateway reads them from Triton's configs).
PARAM_KIND = "kind"  # on a bank: KIND_BANK; absent on a classifier
KIND_BANK = "bank"
KIND_CLASSIFIER = "classifier"
PARAM_ADAPTERS_MODEL = "adapters_model"  # on a bank: its companion's name
PARAM_BANK = "bank"  # on the companion: the bank it belongs to
PARAM_MAX_RANK = "max_rank"  # on a bank: the rank every adapter is padded to
PARAM_MATRICES = "matrices"  # on a bank: the vision-tower matrices it adapts, comma-separated
BANK_MATRICES = ("q", "k", "v", "o")  # what a bank may adapt: rows of in_proj_weight, and out_proj (o)
# PARAM_LOGIT_SCALE (above) is on a bank too: logit = logit_scale x cos(image_embeds, class embedding).


def adapters_model_name(name: str) -> str:
    """The name of the companion that a bank `name` reserves (its adapter table and class embeddings)."""
    return f"{name}{ADAPTERS_MODEL_SUFFIX}"


@dataclass(frozen=True)
class BankShape:
    """What a bank's Triton config says: its tensors and the parameters the gateway needs."""

    image_size: int
    embedding_dim: int
    max_batch_size: int
    adapters_model: str
    logit_scale: float
    max_rank: int
    matrices: tuple[str, ...]


@dataclass(frozen=True)
class AdapterRow:
    """One row of a bank version's adapter table (the companion's ``adapters`` output)."""

    adapter: str  # its id; BASE_ADAPTER for slot 0
    slot: int  # what the ``adapter`` input takes; a slot means one content for the bank's whole life
    num_classes: int
    rank: int  # before padding to the bank's max rank; 0 for the base
    matrices: tuple[str, ...]  # the projections it updates, both towers (q, k, v, o)
    encoders: tuple[str, ...]  # the towers it updates (text, vision)
    lora_sha256: str  # its file's content hash ("" for the base)
    version_added: int  # the bank version that added it (1 for the base)
    templates: tuple[str, ...]  # its class embeddings' prompt templates


def is_bank(config: dict[str, Any]) -> bool:
    """True for the config of an adapter bank (``parameters { kind: "bank" }``)."""
    return parameter(config, PARAM_KIND) == KIND_BANK


def bank_shape(name: str, config: dict[str, Any]) -> BankShape:
    """A bank's shapes and parameters from its Triton config (JSON form), checked against the
    contract; `ValueError` for a model that does not follow it."""
    inputs, outputs = _tensors(config, "input"), _tensors(config, "output")
    if not is_bank(config) or INPUT_NAME not in inputs or BANK_ADAPTER_NAME not in inputs \
            or BANK_OUTPUT_NAME not in outputs:
        raise ValueError(f"model {name} is not a cliplora adapter bank")
    dims, slot, embeds = _dims(inputs[INPUT_NAME]), _dims(inputs[BANK_ADAPTER_NAME]), _dims(outputs[BANK_OUTPUT_NAME])
    if len(dims) != 3 or dims[0] != dims[1] or dims[2] != CHANNELS or slot != [1] or len(embeds) != 1 or embeds[0] < 1:
        raise ValueError(f"bank {name} has image dims {dims}, adapter dims {slot} and {BANK_OUTPUT_NAME} dims {embeds}")
    try:
        adapters_model = parameter(config, PARAM_ADAPTERS_MODEL) or ""
        logit_scale = float(parameter(config, PARAM_LOGIT_SCALE) or "nan")
        max_rank = int(parameter(config, PARAM_MAX_RANK) or "0")
        matrices = tuple((parameter(config, PARAM_MATRICES) or "").split(","))
    except ValueError:
        raise ValueError(f"bank {name} has unreadable parameters") from None
    if adapters_model != adapters_model_name(name) or not logit_scale > 0 or max_rank < 1 \
            or not set(matrices) <= set(BANK_MATRICES):
        raise ValueError(f"bank {name} has parameters {adapters_model=}, {logit_scale=}, {max_rank=}, {matrices=}")
    return BankShape(dims[0], embeds[0], int(config.get("max_batch_size", 0)), adapters_model, logit_scale,
                     max_rank, matrices)


def adapters_model_shape(name: str, config: dict[str, Any]) -> int:
    """The embedding size D of a bank's companion (`adapters_model_name`), checked against the contract."""
    inputs, outputs = _tensors(config, "input"), _tensors(config, "output")
    wanted = {CLASS_EMBEDS_NAME, CLASS_COUNT_NAME, CLASS_NAMES_NAME, ADAPTER_TABLE_NAME}
    if BANK_ADAPTER_NAME not in inputs or not wanted <= outputs.keys() or not parameter(config, PARAM_BANK):
        raise ValueError(f"model {name} is not the adapter table of a cliplora bank")
    embeds = _dims(outputs[CLASS_EMBEDS_NAME])
    if len(embeds) != 2 or embeds[1] < 1 or int(config.get("max_batch_size", 0)) != 0:
        raise ValueError(f"adapter table {name} has {CLASS_EMBEDS_NAME} dims {embeds}")
    return embeds[1]


def read_adapter_table(raw: bytes | str) -> list[AdapterRow]:
    """The companion's ``adapters`` output (JSON), base first; `ValueError` when it is not one."""
    import json

    try:
        rows = json.loads(raw)
        table = [AdapterRow(**{**row, "matrices": tuple(row["matrices"]), "encoders": tuple(row["encoders"]),
                               "templates": tuple(row["templates"])}) for row in rows]
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"not an adapter table: {exc}") from None
    if not table or table[0].adapter != BASE_ADAPTER or table[0].slot != BASE_SLOT:
        raise ValueError(f"an adapter table starts with {BASE_ADAPTER!r} in slot {BASE_SLOT}")
    return table


# Promotion (`cliplora bank promote NAME --adapter ID`, docs/architecture.md "Adapter
# banks"): the adapter exported as a merged classifier `NAME--ID`, whose config names the
# bank, the adapter and the adapter's content hash. The gateway answers
# model=NAME, adapter=ID with it while it is ready and those three match the bank's current
# adapter table (a replaced adapter never answers from a stale promotion).
PROMOTED_SEPARATOR = "--"
PARAM_PROMOTED_FROM = "promoted_from"  # on a promoted classifier: its bank
PARAM_PROMOTED_ADAPTER = "promoted_adapter"  # ... the adapter id
PARAM_PROMOTED_LORA_SHA256 = "promoted_lora_sha256"  # ... the adapter's content hash when promoted


def promoted_model_name(bank: str, adapter: str) -> str:
    """The merged classifier that serves adapter `adapter` of bank `bank` once promoted."""
    return f"{bank}{PROMOTED_SEPARATOR}{adapter}"


@dataclass(frozen=True)
class Promotion:
    """What a promoted classifier's config says it serves."""

    bank: str
    adapter: str
    lora_sha256: str


def promotion(config: dict[str, Any]) -> Promotion | None:
    """The promotion a classifier's config (JSON form) declares, or None for any other model."""
    bank = parameter(config, PARAM_PROMOTED_FROM)
    adapter = parameter(config, PARAM_PROMOTED_ADAPTER)
    if not bank or not adapter:
        return None
    return Promotion(bank, adapter, parameter(config, PARAM_PROMOTED_LORA_SHA256) or "")


# A bank with open vocabulary (`cliplora bank create --open-vocabulary`, docs/architecture.md
# "Adapter banks"): the bank's config names its text encoder
# (PARAM_TEXT_MODEL, `<name>_text`) and the BPE vocabulary's sha256 (PARAM_VOCAB_SHA256);
# the text encoder takes ``tokens`` INT32 [77] and ``adapter`` INT32 [1] per sample (each
# adapter's adapted text tower) -> ``text_embeds`` FP32 [D], and names its bank with
# PARAM_CLASSIFIER. An adapter's templates are its row's in the adapter table.


def is_bank_text_model(config: dict[str, Any]) -> bool:
    """True for a bank's text encoder: a text encoder with the per-sample ``adapter`` input."""
    return is_text_model(config) and BANK_ADAPTER_NAME in _tensors(config, "input")
