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
