"""Verification of a staged ``NAME_text`` before it is published: each slot it adds, as an
export verifies its text encoder (`cliplora.export.open_vocabulary`).

For each slot (an adapter at `bank add`, the base at `bank create`), on the slot's own
prompts (its classes x templates) and the export's probe strings
(`cliplora.export.open_vocabulary.PROBE_STRINGS`):

- **the tokenizer**: the gateway's (torch-free) tokenizer must give open_clip's ids for
  every string (refused before anything else runs), and the ids fed to the staged graph
  (ours) are compared with those the reference gets (open_clip's);
- **against the unmerged reference**: the slot's unit text embeddings against the text
  tower with the adapter's text updates applied unmerged (`bank_verify.Reference`, the
  one the image side's checks use), as a
  logit-error bound ``logit_scale x max |Δt|`` (the error of any logit those texts give,
  for any image) within the export's tolerance;
- **against the base**: with text updates the slot must move some text embedding by more
  than that tolerance (as export refuses a no-op adapter); without, it must stay within
  it (its text factors are zero: it answers as the base's text tower);
- **mixed batches**: one batch interleaving the prompts of every new slot and the base's
  probe strings gives each row what a batch of its slot alone gives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, zip_longest

import numpy as np
import onnxruntime as ort
import torch

from cliplora.core import contract, open_vocab
from cliplora.core.bank_manifest import AdapterVerificationRecord, BankTextVerificationRecord
from cliplora.core.errors import FailedPrecondition
from cliplora.export import open_vocabulary, verify
from cliplora.export.bank_verify import Reference
from cliplora.model.base_model import BaseModel
from cliplora.model.lora import LoraAdapter


@dataclass(frozen=True)
class TextCase:
    """One slot to verify: the adapter there (None: the base) and its prompts."""

    adapter_id: str
    adapter: LoraAdapter | None
    slot: int
    classes: Sequence[str]
    templates: Sequence[str]

    @property
    def strings(self) -> list[str]:
        return [*open_vocab.prompts(self.classes, self.templates), *open_vocabulary.PROBE_STRINGS]

    @property
    def text_updates(self) -> bool:
        return self.adapter is not None and any(u.tower == "text" for u in self.adapter.updates)


def embed(session: ort.InferenceSession, tokens: np.ndarray, slots: Sequence[int]) -> np.ndarray:
    """``text_embeds`` [N, D] of one batch whose row i uses slot ``slots[i]``."""
    feeds = {contract.TEXT_INPUT_NAME: tokens.astype(contract.TEXT_INPUT_NUMPY_DTYPE),
             contract.BANK_ADAPTER_NAME: np.asarray(slots, dtype=contract.BANK_ADAPTER_NUMPY_DTYPE).reshape(-1, 1)}
    return session.run([contract.TEXT_OUTPUT_NAME], feeds)[0]


def verify_slots(session: ort.InferenceSession, base: BaseModel, cases: Sequence[TextCase],
                 reference: Reference) -> list[BankTextVerificationRecord]:
    """Each case's record (`passed` False with the reasons in `failures`); FailedPrecondition
    first when the gateway's tokenizer disagrees with open_clip's on a string."""
    tokenizer = open_vocabulary.check_tokenizer(base.tokenizer, list(chain.from_iterable(c.strings for c in cases)))
    ids = {c.slot: tokenizer(c.strings, contract.CONTEXT_LENGTH) for c in cases}
    alone = {c.slot: embed(session, ids[c.slot], [c.slot] * len(ids[c.slot])) for c in cases}
    probes = tokenizer(list(open_vocabulary.PROBE_STRINGS), contract.CONTEXT_LENGTH)
    added = any(c.slot != contract.BASE_SLOT for c in cases)  # `bank create` checks the base slot alone
    mixed = _mixed_batch_errors(session, ids, alone, probes, base.logit_scale) if added else {}
    return [_check(case, session, base, reference, ids[case.slot], alone[case.slot], mixed.get(case.slot))
            for case in cases]


@torch.no_grad()
def _check(case: TextCase, session: ort.InferenceSession, base: BaseModel, reference: Reference,
           ours: np.ndarray, embeds: np.ndarray, mixed: float | None) \
        -> BankTextVerificationRecord:
    scale, strings = base.logit_scale, case.strings
    theirs = base.tokenizer(strings).numpy()  # open_clip's own ids: the reference's path
    with reference.adapted(case.adapter) as adapted:
        expected = open_vocabulary.text_embeddings(adapted, torch.from_numpy(theirs.astype(np.int64)))
    compare = open_vocabulary.compare_embeddings
    base_embeds = None if case.slot == contract.BASE_SLOT else embed(session, ours, [contract.BASE_SLOT] * len(ours))
    record = BankTextVerificationRecord(
        strings=len(strings), tolerance_abs_logit=verify.FP32_TOLERANCE,
        text_vs_reference=compare(embeds, expected, scale).record(), text_updates=case.text_updates,
        text_vs_base=None if base_embeds is None else compare(embeds, base_embeds, scale).record(),
        mixed_batch_max_logit_error=mixed, tokenizer_matches=bool(np.array_equal(ours, theirs)), passed=False)
    return record.model_copy(update={"passed": not failures(record)})


def _mixed_batch_errors(session: ort.InferenceSession, ids: dict[int, np.ndarray], alone: dict[int, np.ndarray],
                        probes: np.ndarray, logit_scale: float) -> dict[int, float]:
    """Per slot, logit_scale x max |Δ| between one batch interleaving every slot's rows (and
    the base's probe strings) and the rows of batches of one slot."""
    rows = {slot: [(slot, i) for i in range(len(tokens))] for slot, tokens in ids.items()}
    by_slot = {**ids}
    expected = {**alone}
    if contract.BASE_SLOT not in ids:
        rows[contract.BASE_SLOT] = [(contract.BASE_SLOT, i) for i in range(len(probes))]
        by_slot[contract.BASE_SLOT] = probes
        expected[contract.BASE_SLOT] = embed(session, probes, [contract.BASE_SLOT] * len(probes))
    order = [row for group in zip_longest(*rows.values()) for row in group if row is not None]
    mixed = embed(session, np.stack([by_slot[s][i] for s, i in order]), [s for s, _ in order])
    errors = dict.fromkeys(rows, 0.0)
    for got, (slot, i) in zip(mixed, order, strict=True):
        error = float(logit_scale * np.linalg.norm(got.astype(np.float64) - expected[slot][i]))
        errors[slot] = max(errors[slot], error)
    return errors


def failures(record: BankTextVerificationRecord) -> list[str]:
    """Why a slot's text check failed (nothing: it passed)."""
    bound, problems = record.tolerance_abs_logit, []
    error = record.text_vs_reference.max_logit_error
    if error > bound:
        problems.append(f"its text embeddings differ from the unmerged reference's by up to {error:.3g} in logits "
                        f"(tolerance {bound:g})")
    moved = record.text_vs_base.max_logit_error if record.text_vs_base else None
    if moved is not None and record.text_updates and moved <= bound:
        problems.append(f"its text updates change no text embedding of the base by more than {bound:g} in logits "
                        f"(max {moved:.3g}): the bank would not apply them")
    if moved is not None and not record.text_updates and moved > bound:
        problems.append(f"without text updates its text embeddings differ from the base's by {moved:.3g} in logits")
    if record.mixed_batch_max_logit_error is not None and record.mixed_batch_max_logit_error > bound:
        problems.append(f"in a batch mixing adapters its prompts differ from a batch of its own by up to "
                        f"{record.mixed_batch_max_logit_error:.3g} in logits (tolerance {bound:g})")
    if not record.tokenizer_matches:
        problems.append("the gateway's tokenizer gives other token ids than open_clip's for its strings")
    return problems


def check_passed(what: str, record: BankTextVerificationRecord) -> None:
    """FailedPrecondition naming `what` and every failure, when `record` did not pass."""
    if not record.passed:
        raise FailedPrecondition(f"{what} failed its text encoder verification inside the bank, nothing published: "
                                 f"{'; '.join(failures(record))}")


def with_text_checks(session: ort.InferenceSession, base: BaseModel, cases: Sequence[TextCase],
                     records: Sequence[AdapterVerificationRecord],
                     reference: Reference) -> list[AdapterVerificationRecord]:
    """The added adapters' records with their text check (``text``); FailedPrecondition at
    the first that fails."""
    checked = []
    for case, record, text in zip(cases, records, verify_slots(session, base, cases, reference), strict=True):
        check_passed(f"adapter {case.adapter_id!r}", text)
        checked.append(record.model_copy(update={"text": text}))
    return checked
