"""The tensor contract between the exporter, the Triton model config and the gateway.

One exported model is one graph: ``image`` (UINT8, ``[N, S, S, 3]``, RGB, already
resized and centre-cropped exactly as open_clip does) -> ``logits`` (FP32, ``[N, C]``,
``logit_scale * cos(image, class)``). Everything that names a tensor, a dtype or a
shape reads it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

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
