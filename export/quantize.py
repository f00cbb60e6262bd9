"""`--target cpu-int8`: an INT8 graph for CPU serving, published only past an accuracy gate.

**Method: dynamic quantization** (`onnxruntime.quantization.quantize_dynamic`): the
weights of the image tower's MatMuls become per-channel symmetric INT8 (QInt8) at
export; activations are quantized per batch at run time (DynamicQuantizeLinear ->
MatMulInteger, which ONNX Runtime's CPU provider runs with VNNI/AVX2 kernels). Only
MatMuls with a constant weight are quantized (``MatMulConstBOnly``): the attention
products q·kᵀ and softmax·v stay fp32, as do the patch-embedding convolution, the
preprocessing (/255, mean/std), the normalisations, the class head (the final MatMul is
excluded by name) and the outputs: the input/output contract is unchanged. Measured on
ViT-B/16 here (docs/benchmarks.md): 2.9x faster in process at batch 1 and 8 at max
|Δlogit| 0.025 (logit scale 14.3). Dynamic rather than static QDQ: it needs no
calibration data to be right, and static activation ranges fit ViT activations (large
outliers after LayerNorm) badly; ``--calibration`` images serve the gate instead.

**The gate** compares the INT8 graph with the fp32 graph of the same merged model (itself
verified against the unmerged reference first) on the probe images and on every
``--calibration`` image:

- max |Δlogit| at most ``INT8_COSINE_TOLERANCE · logit_scale`` (2.0 for OpenAI's scale
  of 100). INT8 keeps 8 bits per weight row (a relative step of 1/127 of its largest
  value) and per activation tensor; through 12-24 blocks the embedding direction drifts
  by ~1e-3 .. 5e-3 in cosine (measured 2.5e-3 worst on ViT-B/16 probes), so the bound
  leaves 4-8x room and still stops a quantization that lost the model (a broken one
  moves logits by whole units). It also means no image whose fp32 top-1 leads by more
  than twice the bound can change its answer (each logit moves by at most the bound),
  so only near-ties may flip;
- with at least ``MIN_IMAGES_FOR_RATE`` (100) images, top-1 agreement at least
  ``MIN_TOP1_AGREEMENT`` (99%): on a real image set a few near-ties may flip, but one in a
  hundred is the most a CPU target may change answers; with fewer images a rate means
  little, and the bound alone applies.

onnx and ONNX Runtime are imported where they run: the command line reads the gate's
constants and starts without them.

**Real images, or an explicit ``--uncalibrated``.** The agreement rule needs real images:
on generated probes a real answer rarely exists, logits are close to flat and near-ties
are common, so INT8 noise flips some. Measured on the tiny test models (100 generated
probes): 98% (base) and 97% (LoRA) top-1 agreement, max |Δlogit| 0.11 and 0.13 within the
bound of 0.29, every flip on a probe whose fp32 lead was under 0.021 (median lead 0.25
and 0.16): the 99% rule would refuse sound quantizations, while with the 8 verification
probes and the bound alone, 2 flips in 8 (75%) passed unseen. So ``--target cpu-int8``
asks for ``--calibration`` images (100 or more bring the agreement rule), or for
``--uncalibrated``, which publishes on the logit bound over the ``--probes`` alone and
says so in the manifest (``calibration_images`` 0, no ``min_top1_agreement``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliplora.core import contract
from cliplora.core.manifest import QuantizationGateRecord, QuantizationRecord
from cliplora.core.preprocess import preprocess_file
from cliplora.export.verify import compare, top1_margins

INT8_COSINE_TOLERANCE = 2e-2
MIN_TOP1_AGREEMENT = 0.99
MIN_IMAGES_FOR_RATE = 100
QUANTIZED_OPS = ("MatMul",)


def head_nodes(path: Path) -> list[str]:
    """The nodes that make the class head (the node producing ``logits``): kept fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [node.name for node in graph.node if contract.OUTPUT_NAME in node.output]


class _PreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize(fp32_path: Path, int8_path: Path) -> QuantizationRecord:
    """Write the INT8 graph of `fp32_path` to `int8_path`; returns how it was made."""
    import onnx
    from onnxruntime.quantization import (  # imports onnxruntime's heavy quantizer
        QuantType,
        quantize_dynamic,
    )

    excluded = head_nodes(fp32_path)
    root = logging.getLogger()
    advice = _PreprocessAdvice()  # the quantizer logs it on the root logger; nothing else is dropped
    root.addFilter(advice)
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                         reduce_range=False, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.removeFilter(advice)
    onnx.checker.check_model(str(int8_path), full_check=True)
    return QuantizationRecord(method="dynamic", weight_type="QInt8", per_channel=True, op_types=list(QUANTIZED_OPS),
                              constant_weights_only=True, excluded_nodes=excluded, gate=None)


def calibration_inputs(folder: Path | None, size: int) -> np.ndarray | None:
    """The uint8 crops of every image in `folder` (any depth), as predict would make them."""
    if folder is None:
        return None
    from cliplora.core.datasets import IMAGE_SUFFIXES
    from cliplora.core.errors import InvalidArgument, NotFound

    if not Path(folder).is_dir():
        raise NotFound(f"--calibration folder not found: {folder}")
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidArgument(f"--calibration {folder} holds no images")
    return np.stack([preprocess_file(p, size) for p in files])


@dataclass(frozen=True)
class Gate:
    images: int
    calibration_images: int
    tolerance: float
    top1_agreement: float
    max_abs_logit: float
    mean_abs_logit: float
    min_top1_margin: float | None  # the smallest fp32 top-1 lead over the runner-up; None for one class

    @property
    def failures(self) -> list[str]:
        problems = []
        if self.max_abs_logit > self.tolerance:
            problems.append(f"INT8 logits differ from the fp32 graph's by up to {self.max_abs_logit:.3g} "
                            f"(tolerance {self.tolerance:g})")
        if self.images >= MIN_IMAGES_FOR_RATE and self.top1_agreement < MIN_TOP1_AGREEMENT:
            problems.append(f"INT8 agrees with fp32 on the top-1 class of {self.top1_agreement:.1%} of {self.images} "
                            f"images (at least {MIN_TOP1_AGREEMENT:.0%} needed)")
        return problems

    def record(self) -> QuantizationGateRecord:
        return QuantizationGateRecord(
            images=self.images, calibration_images=self.calibration_images, tolerance_abs_logit=self.tolerance,
            top1_agreement=self.top1_agreement, max_abs_logit=self.max_abs_logit, mean_abs_logit=self.mean_abs_logit,
            min_top1_margin=self.min_top1_margin,
            min_top1_agreement=MIN_TOP1_AGREEMENT if self.images >= MIN_IMAGES_FOR_RATE else None,
            passed=not self.failures)


def gate(fp32_path: Path, int8_path: Path, probes: np.ndarray, calibration: np.ndarray | None,
         logit_scale: float, batch: int = 16) -> Gate:
    """INT8 against fp32 on the probe crops and the calibration crops."""
    from cliplora.core.runtime import create_session, run_logits

    crops = probes if calibration is None else np.concatenate([probes, calibration])
    reference, quantized = create_session(fp32_path), create_session(int8_path)

    def logits(session: object, inputs: np.ndarray) -> np.ndarray:
        return np.concatenate([run_logits(session, inputs[i : i + batch]) for i in range(0, len(inputs), batch)])

    expected = logits(reference, crops).astype(np.float64)
    got = logits(quantized, crops).astype(np.float64)
    comparison = compare(got, expected)
    margins = top1_margins(expected)
    return Gate(
        images=len(crops), calibration_images=0 if calibration is None else len(calibration),
        tolerance=INT8_COSINE_TOLERANCE * logit_scale, top1_agreement=comparison.top1_agreement,
        max_abs_logit=comparison.max_abs_logit, mean_abs_logit=float(np.abs(got - expected).mean()),
        min_top1_margin=None if margins is None else float(margins.min()),
    )


def with_gate(record: QuantizationRecord, result: Gate) -> QuantizationRecord:
    return record.model_copy(update={"gate": result.record()})

