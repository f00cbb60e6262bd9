"""The records an export writes beside each graph: the classifier's ``manifest.json``
(`build_manifest`) and its text encoder's (`text_encoder_manifest`), as the typed records
of `cliplora.core.manifest`.

Optional sections (``gpu_serving``, ``open_vocabulary``, ``quantization``, the
``image_embeds`` tensor) are left out, not written as null, when an export has none: the
records are written with only the fields set, as every manifest before them was.
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime
import torch

import cliplora
from cliplora.core import contract
from cliplora.core.hashing import sha256_file
from cliplora.core.manifest import (
    EnvironmentRecord,
    GpuServingRecord,
    Manifest,
    NoLoraRecord,
    OnnxRecord,
    OpenVocabularyRecord,
    QuantizationRecord,
    TensorRecord,
    TensorsRecord,
    TextEncoderManifest,
    TextTensorsRecord,
    TextVerificationRecord,
    TokenizerRecord,
)
from cliplora.export import verify
from cliplora.export.adapted import AdaptedModels
from cliplora.export.options import ExportOptions
from cliplora.model.base_model import BaseModel
from cliplora.model.graph import EXPORTER, OPSET


def _present(**sections: Any) -> dict[str, Any]:
    """The optional sections an export has (the others stay unset)."""
    return {key: value for key, value in sections.items() if value is not None}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def onnx_record(path: Path, engine_key: str | None) -> OnnxRecord:
    """The graph file: its hash and size, the exporter, and the runtime that verified it."""
    return OnnxRecord(sha256=sha256_file(path), bytes=path.stat().st_size, opset=OPSET, exporter=EXPORTER,
                      onnxruntime_version=onnxruntime.__version__, **_present(tensorrt_engine_key=engine_key))


def gpu_serving_record(base: BaseModel) -> GpuServingRecord:
    """What the FP16 engine may differ by from the verified ONNX file (the fp16 rule of
    export/verify.py); the engine itself is built on the GPU server, so this export cannot
    check it: deploy/compose/smoke_test.sh does there."""
    return GpuServingRecord(engine="TensorRT", engine_precision="fp16",
                            expected_tolerance_abs_logit=verify.tolerance("fp16", base.logit_scale),
                            verified_here=False)


def tensors_record(spec: contract.TensorSpec) -> TensorsRecord:
    """The classifier's inputs and outputs (``image_embeds`` with --open-vocabulary)."""
    embeddings = (TensorRecord(name=contract.EMBEDS_NAME, dtype=contract.OUTPUT_WIRE_DTYPE,
                               shape=[-1, spec.embedding_dim]) if spec.embedding_dim else None)
    return TensorsRecord(
        input=TensorRecord(name=contract.INPUT_NAME, dtype=contract.INPUT_WIRE_DTYPE, shape=[-1, *spec.input_shape]),
        output=TensorRecord(name=contract.OUTPUT_NAME, dtype=contract.OUTPUT_WIRE_DTYPE,
                            shape=[-1, *spec.output_shape]),
        **_present(embeddings=embeddings),
    )


def build_manifest(
    options: ExportOptions,
    models: AdaptedModels,
    *,
    classes: list[str],
    templates: list[str],
    spec: contract.TensorSpec,
    onnx: OnnxRecord,
    verification: verify.Verification,
    quantization: QuantizationRecord | None,
    open_vocabulary: OpenVocabularyRecord | None,
    export_seconds: float,
) -> Manifest:
    """The classifier version's ``manifest.json``; its version number is stamped when it is published."""
    base, adapter = models.base, models.adapter
    return Manifest(
        schema_version=Manifest.schema_versions[-1],
        cliplora_version=cliplora.__version__,
        name=options.name,
        version=None,  # stamped under the publish lock
        created=_now(),
        base=base.record(),
        lora=adapter.record() if adapter else NoLoraRecord(format="none"),
        merge=models.merge_record(options.unmerged),
        classes=classes,
        templates=templates,
        precision=options.graph_precision,
        target=options.target,
        **_present(gpu_serving=gpu_serving_record(base) if options.target == "gpu" else None),
        tensors=tensors_record(spec),
        onnx=onnx,
        verification=verification.record(),
        environment=EnvironmentRecord(python=platform.python_version(), torch=torch.__version__),
        export_seconds=export_seconds,
        **_present(open_vocabulary=open_vocabulary, quantization=quantization),
    )


def text_encoder_manifest(options: ExportOptions, base: BaseModel, *, name: str, tokenizer: TokenizerRecord,
                          onnx: OnnxRecord, verification: TextVerificationRecord) -> TextEncoderManifest:
    """The text encoder version's ``manifest.json`` (its provenance is the classifier's)."""
    return TextEncoderManifest(
        schema_version=TextEncoderManifest.schema_versions[-1],
        cliplora_version=cliplora.__version__,
        name=name,
        classifier=options.name,
        version=None,
        created=_now(),
        precision=options.precision,
        target=options.target,
        tokenizer=tokenizer,
        embedding_dim=base.embedding_dim,
        tensors=TextTensorsRecord(
            input=TensorRecord(name=contract.TEXT_INPUT_NAME, dtype=contract.TEXT_INPUT_WIRE_DTYPE,
                               shape=[-1, contract.CONTEXT_LENGTH]),
            output=TensorRecord(name=contract.TEXT_OUTPUT_NAME, dtype=contract.OUTPUT_WIRE_DTYPE,
                                shape=[-1, base.embedding_dim]),
        ),
        onnx=onnx,
        verification=verification,
    )
