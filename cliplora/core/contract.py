"""The tensor contract between the exporter, the Triton model config and the gateway.

One exported model is one graph: ``image`` (UINT8, ``[N, S, S, 3]``, RGB, already
resized and centre-cropped exactly as open_clip does) -> ``logits`` (FP32, ``[N, C]``,
``logit_scale * cos(image, class)``). Everything that names a tensor, a dtype or a
shape reads it from here.
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


@dataclass(frozen=True)
class TensorSpec:
    """Shapes of one model's input and output, per item (the batch dimension is dynamic)."""

    image_size: int
    num_classes: int

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.num_classes < 1:
            raise ValueError(f"invalid tensor spec {self}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, CHANNELS)

    @property
    def output_shape(self) -> tuple[int]:
        return (self.num_classes,)


def model_shape(name: str, config: dict[str, Any]) -> tuple[int, int, int]:
    """(image size, classes, max batch size) from a model's Triton config, checked against
    the tensor contract; `ValueError` for a model that does not follow it."""
    inputs = {i["name"]: i for i in config.get("input", [])}
    outputs = {o["name"]: o for o in config.get("output", [])}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ValueError(f"model {name} does not follow the cliplora tensor contract")
    dims = [int(d) for d in inputs[INPUT_NAME]["dims"]]
    classes = [int(d) for d in outputs[OUTPUT_NAME]["dims"]]
    if len(dims) != 3 or dims[0] != dims[1] or dims[2] != CHANNELS or len(classes) != 1:
        raise ValueError(f"model {name} has input dims {dims} and output dims {classes}")
    return dims[0], classes[0], int(config.get("max_batch_size", 0))
