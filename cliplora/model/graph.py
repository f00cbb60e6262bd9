"""The exported graphs: the classifier (uint8 NHWC image -> logits, preprocessing and head
inside) and, for ``--open-vocabulary``, the adapted text encoder (token ids -> embeddings).

``image`` [N, S, S, 3] uint8 -> /255 -> (x - mean) / std -> NCHW -> image tower ->
L2 normalisation -> ``f @ (logit_scale · T)`` -> ``logits`` [N, C] fp32.

Exported with torch's TorchScript-based ONNX exporter at opset 17: on this project's
2-core machines it exports a ViT-B/16 an order of magnitude faster than the dynamo
exporter, and its graphs (LayerNormalization, MatMul attention) run on ONNX Runtime's
CPU, CUDA and TensorRT providers alike. In fp16 the image tower runs in half precision;
the input stays uint8 and the normalisation, the head and the output stay fp32.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from cliplora.core import contract

OPSET = 17
EXPORTER = f"torch.onnx TorchScript exporter (torch {torch.__version__})"
PRECISIONS = dict(zip(contract.PRECISIONS, (torch.float32, torch.float16), strict=True))  # -> the torch dtype


class ClassifierGraph(nn.Module):
    """The whole classifier as one module, the thing exported.

    With ``embeddings=True`` (``--open-vocabulary``) it also returns the L2-normalised
    image features the head multiplies, as ``image_embeds``: nothing more is computed,
    only one more output is kept.
    """

    def __init__(
        self,
        visual: nn.Module,
        text_matrix: torch.Tensor,
        logit_scale: float,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        precision: str = "fp32",
        *,
        embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.dtype = PRECISIONS[precision]
        self.embeddings = embeddings
        # A half-precision graph gets its own copy: the fp32 model is still needed.
        self.visual = visual if precision == "fp32" else copy.deepcopy(visual).to(self.dtype)
        self.register_buffer("head", (text_matrix.float() * logit_scale).contiguous())
        self.register_buffer("mean", torch.tensor(mean, dtype=self.dtype).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=self.dtype).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(self.dtype) / 255.0
        x = (x - self.mean) / self.std
        features = F.normalize(self.visual(x).float(), dim=-1)
        logits = features @ self.head
        return (logits, features) if self.embeddings else logits

    @property
    def output_names(self) -> list[str]:
        return [contract.OUTPUT_NAME, contract.EMBEDS_NAME] if self.embeddings else [contract.OUTPUT_NAME]


class TextGraph(nn.Module):
    """The adapted text encoder as one module: open_clip token ids (INT32 [N, 77]) ->
    L2-normalised embeddings (FP32 [N, D]), the columns the class head is made of.

    In fp16 the encoder runs in half precision (a copy without the image tower); the
    ids stay integers and the normalisation and output stay fp32.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        super().__init__()
        self.dtype = PRECISIONS[precision]
        if precision == "fp32":
            self.clip = model
        else:  # deepcopy's memo leaves the image tower out of the copy
            self.clip = copy.deepcopy(model, memo={id(model.visual): None}).to(self.dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens.long()).float(), dim=-1)

    output_names = [contract.TEXT_OUTPUT_NAME]


def export_classifier(graph: ClassifierGraph, image_size: int, path: Path) -> None:
    """Write the classifier to `path` with a dynamic batch dimension, and check the file."""
    example = torch.zeros((2, image_size, image_size, contract.CHANNELS), dtype=torch.uint8)
    _export(graph, example, contract.INPUT_NAME, graph.output_names, path)


def export_text_encoder(graph: TextGraph, path: Path, start_token: int, end_token: int) -> None:
    """Write the text encoder to `path` with a dynamic batch dimension, and check the file."""
    example = torch.zeros((2, contract.CONTEXT_LENGTH), dtype=torch.int32)
    example[:, 0], example[0, 1], example[1, 5] = start_token, end_token, end_token
    _export(graph, example, contract.TEXT_INPUT_NAME, graph.output_names, path)


def _export(graph: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str], path: Path) -> None:
    graph.eval()
    dynamic = {name: {0: "batch"} for name in (input_name, *output_names)}
    # With gradients off, nn.MultiheadAttention takes its fused "fast path"
    # (aten::_native_multi_head_attention), which has no ONNX form; tracing with
    # gradients on records the plain ops instead.
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer notes
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)
