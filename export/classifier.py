"""The classifier graph: written, verified against the unmerged reference, and for
``--target cpu-int8`` quantized behind its accuracy gate, all in the staging folder.

Nothing here touches the repository: a failure raises `FailedPrecondition` ("...,
nothing published") and the staging folder goes with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cliplora.core import contract
from cliplora.core.errors import FailedPrecondition
from cliplora.core.manifest import QuantizationRecord
from cliplora.core.progress import Progress
from cliplora.core.runtime import create_session, run_logits
from cliplora.export import quantize, verify
from cliplora.export.adapted import AdaptedModels, FoldedHeads
from cliplora.export.engine_key import stamp_engine_key
from cliplora.export.options import ExportOptions
from cliplora.model.graph import ClassifierGraph, export_classifier

FP32_STAGED_NAME = "model.fp32.onnx"  # cpu-int8: the verified fp32 graph, beside the version folder


@dataclass(frozen=True)
class StagedClassifier:
    """The classifier's version folder in the staging area, and the files in it."""

    folder: Path  # becomes <repository>/<name>/<version>
    path: Path  # model.onnx: what is published
    verified_path: Path  # the graph verified against the reference (the fp32 one for cpu-int8)
    engine_key: str | None  # --target gpu: the TensorRT engine-cache key


def write_classifier(options: ExportOptions, models: AdaptedModels, heads: FoldedHeads, staging: Path,
                     progress: Progress) -> StagedClassifier:
    """Export ``uint8 image -> logits`` (and ``image_embeds`` with --open-vocabulary) to ONNX."""
    base = models.base
    folder = staging / "version"
    folder.mkdir()
    path = folder / contract.MODEL_FILENAME
    verified_path = staging / FP32_STAGED_NAME if options.int8 else path  # cpu-int8: quantized after verification
    graph = ClassifierGraph(models.exported_visual(options.unmerged), heads.merged, base.logit_scale, base.mean,
                            base.std, options.precision, embeddings=options.open_vocabulary)
    with progress.step(f"exporting ONNX ({options.precision}{', unmerged branches' if options.unmerged else ''})"):
        export_classifier(graph, base.image_size, verified_path)
    engine_key = None
    if options.target == "gpu":
        with progress.step("keying the TensorRT engine cache to these weights"):
            engine_key = stamp_engine_key(path)
    return StagedClassifier(folder, path, verified_path, engine_key)


def verify_classifier(options: ExportOptions, models: AdaptedModels, heads: FoldedHeads,
                      staged: StagedClassifier, progress: Progress) -> verify.Verification:
    """The ONNX graph on the product path against the unmerged reference; stops on any failure."""
    with progress.step(f"verifying against the unmerged PyTorch reference ({options.probes} probe images)"):
        verification = compare_with_reference(options, models, heads, staged.verified_path)
    if verification.failures:
        raise FailedPrecondition("verification failed, nothing published: " + "; ".join(verification.failures))
    progress.info(
        f"max |Δlogit| ONNX vs reference {verification.onnx_vs_reference.max_abs_logit:.2e} "
        f"(tolerance {verification.tolerance:g}), top-1 agreement "
        f"{verification.onnx_vs_reference.top1_agreement:.0%}"
    )
    return verification


@torch.no_grad()
def compare_with_reference(options: ExportOptions, models: AdaptedModels, heads: FoldedHeads,
                           onnx_path: Path) -> verify.Verification:
    """Probe images through ONNX Runtime and through the PyTorch models (`cliplora.export.verify`)."""
    base = models.base
    images = verify.probe_images(base.image_size, options.probes)
    session = create_session(onnx_path, precision=options.precision)
    onnx_logits = run_logits(session, verify.product_inputs(images, base.image_size))

    def torch_logits(model: torch.nn.Module, texts: torch.Tensor) -> np.ndarray:
        return verify.reference_logits(model, texts, base.logit_scale, images, base.image_size, base.mean, base.std)

    expected = torch_logits(models.reference, heads.reference)
    bound = verify.tolerance(options.precision, base.logit_scale)
    merged_logits = torch_logits(models.merged, heads.merged) if heads.base is not None else None
    base_logits = torch_logits(base.model, heads.base) if heads.base is not None else None
    return verify.Verification(
        precision=options.precision,
        tolerance=bound,
        probes=len(images),
        onnx_vs_reference=verify.compare(onnx_logits, expected),
        merged_torch_vs_reference=verify.compare(merged_logits, expected) if merged_logits is not None else None,
        onnx_vs_base=verify.compare(onnx_logits, base_logits) if base_logits is not None else None,
        merged_vs_base=verify.compare(merged_logits, base_logits) if base_logits is not None else None,
        top1_consistent=verify.top1_margin_ok(onnx_logits, expected, bound),
    )


def quantize_classifier(options: ExportOptions, models: AdaptedModels, staged: StagedClassifier,
                        progress: Progress) -> QuantizationRecord:
    """The INT8 graph of the verified fp32 one, published only past its gate (`cliplora.export.quantize`)."""
    size = models.base.image_size
    calibration = quantize.calibration_inputs(options.calibration, size)
    with progress.step("quantizing the image tower to INT8 (dynamic, per channel)"):
        record = quantize.quantize(staged.verified_path, staged.path)
    probes = verify.product_inputs(verify.probe_images(size, options.probes), size)
    n = len(probes) + (0 if calibration is None else len(calibration))
    with progress.step(f"INT8 accuracy gate against the fp32 graph ({n} images)"):
        result = quantize.gate(staged.verified_path, staged.path, probes, calibration, models.base.logit_scale)
    if result.failures:
        raise FailedPrecondition("INT8 accuracy gate failed, nothing published: " + "; ".join(result.failures))
    progress.info(f"INT8 vs fp32: top-1 agreement {result.top1_agreement:.1%} of {result.images} images, "
                  f"max |Δlogit| {result.max_abs_logit:.3g} (tolerance {result.tolerance:g})")
    return quantize.with_gate(record, result)
