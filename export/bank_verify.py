"""Verification of a bank version before it is published: every adapter it adds, inside the bank.

For each new adapter, on the probe images of `cliplora.export.verify` (product crops into
ONNX Runtime, open_clip's transform into PyTorch):

- **against the unmerged reference**: the staged bank's ``image_embeds`` for the adapter's
  slot, times its class embeddings (its own adapted text tower), against the logits of
  `cliplora.model.reference` with the adapter applied unmerged to both towers; the export's
  tolerance (fp32: 1e-3 on logits) and its top-1 rule;
- **against the base**: the adapter must change the answer by more than that tolerance
  (logits of the base slot with the base text tower's class embeddings): an adapter the
  bank would not apply, or a no-op one, is refused, as `export` refuses it;
- **mixed batches**: one batch in which the probes cycle through every new slot and the
  base gives each sample what a batch of that slot alone gives it (within the tolerance,
  as a bound on the logit error for any class: logit_scale x max |Δ embedding|);
- **cpu-int8**: the INT8 bank's slot against the fp32 bank's (the same factors, fp32
  base weights), by the INT8 gate of `cliplora.export.quantize`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from PIL import Image
from torch import nn

from cliplora.core import contract
from cliplora.core.bank_manifest import AdapterVerificationRecord, BaseVerificationRecord
from cliplora.export import quantize, verify
from cliplora.model import head
from cliplora.model.base_model import BaseModel
from cliplora.model.lora import LoraAdapter
from cliplora.model.merge import attention_module, check_shapes, target_weight
from cliplora.model.reference import LoraBranch, build_reference


@dataclass(frozen=True)
class Probes:
    images: list[Image.Image]
    crops: np.ndarray  # uint8 [P, S, S, 3], as the gateway makes them


def probes(size: int, count: int) -> Probes:
    images = verify.probe_images(size, count)
    return Probes(images, verify.product_inputs(images, size))


def embed(session: ort.InferenceSession, crops: np.ndarray, slots: Sequence[int]) -> np.ndarray:
    """``image_embeds`` [N, D] of one batch whose sample i uses slot ``slots[i]``."""
    feeds = {contract.INPUT_NAME: crops,
             contract.BANK_ADAPTER_NAME: np.asarray(slots, dtype=contract.BANK_ADAPTER_NUMPY_DTYPE).reshape(-1, 1)}
    return session.run([contract.BANK_OUTPUT_NAME], feeds)[0]


def mixed_batch_errors(session: ort.InferenceSession, crops: np.ndarray, alone: Mapping[int, np.ndarray],
                       logit_scale: float) -> dict[int, float]:
    """Per slot, logit_scale x max |Δ| between a batch cycling through `alone`'s slots and
    `alone` (each slot's embeddings of `crops` from a batch of that slot only)."""
    cycle = sorted(alone)
    rows = max(len(crops), len(cycle))
    slots = [cycle[i % len(cycle)] for i in range(rows)]
    mixed = embed(session, crops[[i % len(crops) for i in range(rows)]], slots)
    errors = dict.fromkeys(cycle, 0.0)
    for i, slot in enumerate(slots):
        error = float(logit_scale * np.linalg.norm(mixed[i].astype(np.float64) - alone[slot][i % len(crops)]))
        errors[slot] = max(errors[slot], error)
    return errors


def _int8_gate(int8: np.ndarray, fp32: np.ndarray, logit_scale: float) -> quantize.Gate:
    comparison = verify.compare(int8, fp32)
    margins = verify.top1_margins(fp32)
    return quantize.Gate(images=len(fp32), calibration_images=0, tolerance=quantize.INT8_COSINE_TOLERANCE * logit_scale,
                         top1_agreement=comparison.top1_agreement, max_abs_logit=comparison.max_abs_logit,
                         mean_abs_logit=float(np.abs(int8.astype(np.float64) - fp32).mean()),
                         min_top1_margin=None if margins is None else float(margins.min()))


class Reference:
    """The unmerged reference (`cliplora.model.reference`) built once per bank command, for
    every check it makes (the image side here, the text side in
    `cliplora.export.bank_text_verify`): each adapter's branches go in for its check and come
    out after, so the base is copied once, not once per adapter or per tower (64 adapters in
    one add). `adapted(None)` is the base itself (the base slot)."""

    def __init__(self, model: nn.Module) -> None:
        self.base = model
        self.model = build_reference(model, None, share_weights=True)  # reads the base's tensors, copies none

    @contextmanager
    def adapted(self, adapter: LoraAdapter | None) -> Iterator[nn.Module]:
        touched = []
        try:
            for update in adapter.updates if adapter else ():  # as build_reference adds them
                check_shapes(update, target_weight(self.base, update.tower, update.block, update.target))
                attention = attention_module(self.model, update.tower, update.block)
                attention.add_branch(update.target, LoraBranch(update.a, update.b, update.scale))
                touched.append(attention)
            yield self.model
        finally:
            for attention in touched:
                attention.branches.clear()


@dataclass(frozen=True)
class AdapterCase:
    """One adapter to verify: its slot, its classes and its embeddings from the staged bank."""

    adapter_id: str
    adapter: LoraAdapter
    slot: int
    classes: Sequence[str]
    templates: Sequence[str]
    class_embeds: np.ndarray  # [C, D], from its adapted text tower
    embeds: np.ndarray  # the fp32 bank's image_embeds of the probes in its slot
    int8_embeds: np.ndarray | None  # cpu-int8: the published INT8 bank's


def check_adapter(case: AdapterCase, base: BaseModel, reference: Reference, sample: Probes,
                  base_embeds: np.ndarray, mixed_error: float) -> AdapterVerificationRecord:
    """The adapter's record; `passed` False with the reasons in `failures`."""
    scale, size = base.logit_scale, base.image_size
    tokens = head.prompt_tokens(base.tokenizer, case.classes, case.templates)
    with reference.adapted(case.adapter) as adapted:
        reference_text = head.text_matrix(adapted, tokens, len(case.classes))
        expected = verify.reference_logits(adapted, reference_text, scale, sample.images, size, base.mean, base.std)
    logits = scale * case.embeds.astype(np.float64) @ case.class_embeds.T
    # Without text updates the base text tower is the adapter's own: its class embeddings.
    base_text = head.text_matrix(base.model, tokens, len(case.classes)).numpy() \
        if any(u.tower == "text" for u in case.adapter.updates) else case.class_embeds.T
    base_logits = scale * base_embeds.astype(np.float64) @ base_text
    bound = verify.FP32_TOLERANCE
    gate = None
    if case.int8_embeds is not None:
        gate = _int8_gate(scale * case.int8_embeds.astype(np.float64) @ case.class_embeds.T, logits, scale).record()
    record = AdapterVerificationRecord(
        probes=len(sample.images), tolerance_abs_logit=bound,
        bank_vs_reference=verify.compare(logits, expected).record(),
        bank_vs_base=verify.compare(logits, base_logits).record(),
        mixed_batch_max_abs_logit=mixed_error,
        top1_consistent=verify.top1_margin_ok(logits, expected, bound),
        int8_gate=gate, passed=False)
    return record.model_copy(update={"passed": not failures(record)})


def failures(record: AdapterVerificationRecord) -> list[str]:
    """Why an adapter's verification failed (nothing: it passed)."""
    bound = record.tolerance_abs_logit
    problems = []
    if record.bank_vs_reference.max_abs_logit > bound:
        problems.append(f"the bank's logits differ from the unmerged reference by "
                        f"{record.bank_vs_reference.max_abs_logit:.3g} (tolerance {bound:g})")
    if not record.top1_consistent:
        problems.append("the bank's top-1 class differs from the reference's on a probe with a clear margin")
    if record.bank_vs_base.max_abs_logit <= bound:
        problems.append(f"the adapter changes no logit of the base by more than {bound:g} (max "
                        f"{record.bank_vs_base.max_abs_logit:.3g}): a no-op adapter (untrained, lora_B all zero?)")
    if record.mixed_batch_max_abs_logit > bound:
        problems.append(f"in a batch mixing adapters its samples differ from a batch of its own by up to "
                        f"{record.mixed_batch_max_abs_logit:.3g} in logits (tolerance {bound:g})")
    if record.int8_gate is not None and not record.int8_gate.passed:
        problems.append(f"INT8 gate: the INT8 bank's logits differ from the fp32 bank's by up to "
                        f"{record.int8_gate.max_abs_logit:.3g} (tolerance {record.int8_gate.tolerance_abs_logit:g})")
    return problems


def check_base(base: BaseModel, reference: Reference, sample: Probes, embeds: np.ndarray, class_embeds: np.ndarray,
               int8_embeds: np.ndarray | None) -> BaseVerificationRecord:
    """Slot 0 of a new bank against the base model (no adapter), at `bank create`."""
    scale = base.logit_scale
    expected = verify.reference_features(reference.model, sample.images, base.image_size, base.mean, base.std)
    error = float(scale * np.linalg.norm(embeds.astype(np.float64) - expected, axis=1).max())
    logits = None
    if len(class_embeds):
        logits = verify.compare(scale * embeds.astype(np.float64) @ class_embeds.T,
                                scale * expected.astype(np.float64) @ class_embeds.T).record()
    gate = None
    if int8_embeds is not None and len(class_embeds):
        gate = _int8_gate(scale * int8_embeds.astype(np.float64) @ class_embeds.T,
                          scale * embeds.astype(np.float64) @ class_embeds.T, scale).record()
    elif int8_embeds is not None:  # no classes: the bound on the logit error for any class
        bound = float(scale * np.linalg.norm(int8_embeds.astype(np.float64) - embeds, axis=1).max())
        gate = quantize.Gate(images=len(embeds), calibration_images=0, top1_agreement=1.0, max_abs_logit=bound,
                             tolerance=quantize.INT8_COSINE_TOLERANCE * scale, mean_abs_logit=bound,
                             min_top1_margin=None).record()
    passed = error <= verify.FP32_TOLERANCE and (gate is None or gate.passed)
    return BaseVerificationRecord(probes=len(sample.images), tolerance_abs_logit=verify.FP32_TOLERANCE,
                                  embeds_logit_error=error, bank_vs_reference=logits, int8_gate=gate, passed=passed)
