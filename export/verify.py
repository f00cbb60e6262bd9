"""Verification: the exported graph against the independent, unmerged reference.

Probe images (deterministic, varied in size, aspect and mode) go two separate ways:
- product path: `cliplora.core.preprocess` (uint8 crop) -> ONNX Runtime -> logits;
- reference path: open_clip's own eval transform -> the unmerged `reference` model ->
  normalised features -> ``logit_scale · f @ T_ref``, where T_ref comes from the
  reference's own (unmerged) text encoder.

Tolerances on max |Δlogit| (logits are ``logit_scale · cosine``):
- fp32: 1e-3 absolute. fp32 rounding in a ViT-B moves logits by ~1e-5 .. 1e-4.
- fp16: ``FP16_COSINE_TOLERANCE · logit_scale`` (0.5 for OpenAI's scale of 100). Half
  precision keeps 11 significant bits (relative step 2^-11 ≈ 4.9e-4); through 12-24
  residual blocks the embedding direction drifts by a few of those steps, so cosines
  move by ~1e-3 and logits by ~0.1. The bound allows 5x that, and top-1 must agree on
  every probe whose reference margin exceeds twice the bound.
The adapter must also *do* something: the merged model's logits must differ from the
base model's by more than the fp32 tolerance, or the export stops (an all-zero
``lora_B``, as the paper's initialisation leaves it, merges into a no-op).

The reference path imports torch and open_clip when it runs; the rest (probes, tolerances,
rules, `DEFAULT_PROBES`) is read by the command line, which starts without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cliplora.core.manifest import ComparisonRecord, VerificationRecord
from cliplora.core.preprocess import clip_crop

if TYPE_CHECKING:
    import torch
    from torch import nn

FP32_TOLERANCE = 1e-3
FP16_COSINE_TOLERANCE = 5e-3
DEFAULT_PROBES = 8


def tolerance(precision: str, logit_scale: float) -> float:
    return FP32_TOLERANCE if precision == "fp32" else FP16_COSINE_TOLERANCE * logit_scale


def probe_images(size: int, count: int = DEFAULT_PROBES, seed: int = 0) -> list[Image.Image]:
    """Deterministic images of varied sizes, aspect ratios, content and modes."""
    rng = np.random.default_rng(seed)
    shapes = [(size, size), (size * 2 + 7, size), (size, size * 3 // 2 + 1), (size // 2 + 3, size // 2 + 1)]
    modes = ["RGB", "RGB", "L", "RGBA", "P", "RGB"]
    images = []
    for i in range(count):
        width, height = shapes[i % len(shapes)]
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 255
        noise = rng.normal(0, 40, (height, width, 3))
        blocks = rng.integers(0, 256, (4, 4, 3)).repeat(-(-height // 4), 0).repeat(-(-width // 4), 1)[:height, :width]
        pixels = np.clip(base * rng.uniform(0.2, 1.0) + noise + blocks * rng.uniform(0, 0.6), 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8), "RGB")
        mode = modes[i % len(modes)]
        images.append(image.convert(mode) if mode != "P" else image.quantize(64))
    return images


def product_inputs(images: Sequence[Image.Image], size: int) -> np.ndarray:
    return np.stack([clip_crop(image, size) for image in images])


def reference_logits(
    reference: nn.Module,
    text_matrix: torch.Tensor,
    logit_scale: float,
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Logits by the reference path: open_clip's transform and a PyTorch model."""
    import torch

    features = torch.from_numpy(reference_features(reference, images, size, mean, std))
    with torch.no_grad():
        return (logit_scale * features @ text_matrix).numpy()


def reference_features(
    reference: nn.Module, images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Unit image embeddings [N, D] by the reference path (open_clip's transform)."""
    import open_clip
    import torch
    import torch.nn.functional as F

    transform = open_clip.image_transform(size, is_train=False, mean=tuple(mean), std=tuple(std))
    with torch.no_grad():
        batch = torch.stack([transform(image) for image in images])
        return F.normalize(reference.encode_image(batch).float(), dim=-1).numpy()


@dataclass(frozen=True)
class Comparison:
    max_abs_logit: float
    top1_agreement: float

    def record(self) -> ComparisonRecord:
        return ComparisonRecord(max_abs_logit=self.max_abs_logit, top1_agreement=self.top1_agreement)


def compare(actual: np.ndarray, expected: np.ndarray) -> Comparison:
    return Comparison(
        max_abs_logit=float(np.abs(actual.astype(np.float64) - expected).max()),
        top1_agreement=float((actual.argmax(axis=1) == expected.argmax(axis=1)).mean()),
    )


def top1_margins(expected: np.ndarray) -> np.ndarray | None:
    """How far each row's top-1 logit leads the runner-up; None with a single class."""
    if expected.shape[1] < 2:
        return None
    top2 = np.sort(expected, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def top1_margin_ok(actual: np.ndarray, expected: np.ndarray, bound: float) -> bool:
    """Top-1 agrees on every probe whose reference top-1 leads the runner-up by > 2·bound."""
    margins = top1_margins(expected)
    if margins is None:
        return True
    clear = margins > 2 * bound
    return bool((actual.argmax(axis=1) == expected.argmax(axis=1))[clear].all())


@dataclass(frozen=True)
class Verification:
    precision: str
    tolerance: float
    probes: int
    onnx_vs_reference: Comparison
    merged_torch_vs_reference: Comparison | None
    onnx_vs_base: Comparison | None
    merged_vs_base: Comparison | None
    top1_consistent: bool  # see `top1_margin_ok`

    @property
    def failures(self) -> list[str]:
        problems = []
        if self.onnx_vs_reference.max_abs_logit > self.tolerance:
            problems.append(
                f"ONNX logits differ from the unmerged reference by {self.onnx_vs_reference.max_abs_logit:.3g} "
                f"(tolerance {self.tolerance:g} for {self.precision})"
            )
        if not self.top1_consistent:
            problems.append("the ONNX model's top-1 class differs from the reference's on a probe with a clear margin")
        if self.merged_torch_vs_reference and self.merged_torch_vs_reference.max_abs_logit > FP32_TOLERANCE:
            problems.append(
                f"the merged PyTorch model differs from the unmerged reference by "
                f"{self.merged_torch_vs_reference.max_abs_logit:.3g} (tolerance {FP32_TOLERANCE:g})"
            )
        if self.merged_vs_base is not None and self.merged_vs_base.max_abs_logit <= FP32_TOLERANCE:
            problems.append(
                f"the adapter changes no logit by more than {FP32_TOLERANCE:g} "
                f"(max {self.merged_vs_base.max_abs_logit:.3g}): a no-op adapter (untrained, lora_B all zero?)"
            )
        return problems

    def record(self) -> VerificationRecord:
        def opt(c: Comparison | None) -> ComparisonRecord | None:
            return c.record() if c else None

        return VerificationRecord(
            probes=self.probes,
            precision=self.precision,
            tolerance_abs_logit=self.tolerance,
            onnx_vs_reference=self.onnx_vs_reference.record(),
            merged_torch_vs_reference=opt(self.merged_torch_vs_reference),
            onnx_vs_base=opt(self.onnx_vs_base),
            merged_vs_base=opt(self.merged_vs_base),
            top1_consistent=self.top1_consistent,
            passed=not self.failures,
        )
