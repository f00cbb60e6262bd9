"""`cliplora export --open-vocabulary`: the adapted text encoder as a model of its own.

Beside the classifier ``<name>`` (whose graph then also outputs ``image_embeds``), the
export publishes ``<name>_text``: the merged text encoder, open_clip token ids -> unit
embeddings, same version number. The gateway embeds request-time labels with it
(`cliplora.core.open_vocab`); the fixed-label path is untouched.

Verification, with the classifier's tolerances (`cliplora.export.verify.tolerance`):

- the ONNX text encoder against the *unmerged* reference's text encoder, on the model's
  own prompts and on awkward probe strings (`PROBE_STRINGS`). For unit embeddings t and
  any unit image embedding f, ``|scale·f·t_onnx - scale·f·t_ref| <= scale·‖t_onnx - t_ref‖``,
  so ``scale · max ‖Δt‖`` bounds the logit error for every possible image: that bound
  must stay within the tolerance;
- the classifier's ``image_embeds`` against the reference's image features, the same way;
  for ``cpu-int8`` (whose INT8 noise is spread over every dimension, so the any-image
  bound above is loose by up to √D) by the logits it gives against the verified strings'
  reference embeddings, within the INT8 gate's tolerance, as its logits were;
- the project's torch-free tokenizer (what the gateway runs) must give open_clip's ids
  for every string verified, or the gateway would embed other prompts than the export:
  checked before anything slow runs (`check_tokenizer`), and measured again on the very
  ids the verification feeds the ONNX text encoder (ours) and the reference (open_clip's),
  which is what the manifest's ``tokenizer_matches`` records.

`plan_open_vocabulary` decides all of this before the export starts (`OpenVocabularyPlan`:
None without ``--open-vocabulary``); `cliplora.export.text_encoder` runs it.

A name ``x`` exported with ``--open-vocabulary`` reserves ``x_text``: no classifier may be
called ``x_text`` while ``x`` has a text encoder, and ``x`` cannot take one while a
classifier ``x_text`` exists (`cliplora.export.publish.check_names`, before the export and
again under the publishing locks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cliplora.core import contract, open_vocab
from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.core.manifest import (
    EmbeddingComparisonRecord,
    TextVerificationRecord,
    TokenizerRecord,
)
from cliplora.core.runtime import create_session
from cliplora.core.tokenizer import ClipTokenizer, default_vocab_path
from cliplora.export.model_config import ModelConfig, OpenVocabularyParameters, text_model_config
from cliplora.export.options import ExportOptions

if TYPE_CHECKING:
    from cliplora.model.base_model import BaseModel

PROBE_STRINGS = (
    "a photo of a dog.",
    "",
    "   spaced   out\ttext\n",
    "Café crème brûlée, naïve façade",
    "東京タワーの写真",
    "a 🐱 with a 🎩 and 👩‍👩‍👧",
    "don't stop: it's 3.14159 or 1,000,000",
    "&lt;b&gt;bold&lt;/b&gt; &amp; HTML",
    "<start_of_text> inside <end_of_text> the text",
    " ".join(["a long caption that goes on"] * 30),  # longer than 77 tokens: truncated
)


def tokenizer_record(tokenizer: ClipTokenizer) -> TokenizerRecord:
    return TokenizerRecord(kind="clip-bpe", vocab=default_vocab_path().name, vocab_sha256=tokenizer.vocab_sha256,
                           vocab_size=tokenizer.vocab_size, context_length=contract.CONTEXT_LENGTH)


def check_tokenizer(open_clip_tokenizer: object, strings: Sequence[str]) -> ClipTokenizer:
    """The gateway's tokenizer, proven to give open_clip's ids for `strings`."""
    from open_clip.tokenizer import SimpleTokenizer

    if not isinstance(open_clip_tokenizer, SimpleTokenizer):
        raise InvalidArgument(f"--open-vocabulary needs CLIP's BPE tokenizer; this model uses "
                              f"{type(open_clip_tokenizer).__name__}")
    ours = ClipTokenizer()
    expected = open_clip_tokenizer(list(strings)).numpy()  # type: ignore[operator]
    got = ours(list(strings), contract.CONTEXT_LENGTH)
    if expected.shape != got.shape or not np.array_equal(expected, got):
        rows = [s for s, a, b in zip(strings, expected, got, strict=True) if not np.array_equal(a, b)]
        raise FailedPrecondition(f"the gateway's tokenizer disagrees with open_clip on {len(rows)} strings, "
                                 f"e.g. {rows[0][:60]!r}; nothing published")
    return ours


@dataclass(frozen=True)
class OpenVocabularyPlan:
    """What ``--open-vocabulary`` adds to an export, decided before anything slow runs."""

    text_model: str  # <name>_text
    tokenizer: ClipTokenizer  # the gateway's, checked against open_clip's on `strings`
    strings: tuple[str, ...]  # what the text encoder is verified on: the model's own prompts, then the probes
    parameters: OpenVocabularyParameters  # what the classifier's config tells the gateway
    config: ModelConfig  # the text encoder's config.pbtxt


def plan_open_vocabulary(options: ExportOptions, base: BaseModel, classes: Sequence[str],
                         templates: Sequence[str]) -> OpenVocabularyPlan | None:
    """The text encoder to publish beside the classifier; None without ``--open-vocabulary``.
    Refuses a model whose tokenizer the gateway cannot reproduce (`check_tokenizer`)."""
    if not options.open_vocabulary:
        return None
    text_model = contract.text_model_name(options.name)
    strings = (*open_vocab.prompts(classes, templates), *PROBE_STRINGS)
    tokenizer = check_tokenizer(base.tokenizer, strings)
    parameters = OpenVocabularyParameters(text_model, base.logit_scale, tuple(templates), tokenizer.vocab_sha256)
    config = text_model_config(text_model, options.name, base.embedding_dim, options.precision,
                               options.max_batch_size, options.target, vocab_sha256=tokenizer.vocab_sha256,
                               runtime=options.runtime)
    return OpenVocabularyPlan(text_model, tokenizer, strings, parameters, config)


@dataclass(frozen=True)
class EmbeddingComparison:
    """How far one set of unit embeddings is from another."""

    max_logit_error: float  # logit_scale · max ‖a - b‖: bounds the logit error for any unit partner
    max_abs: float  # the largest component difference
    min_cosine: float

    def record(self) -> EmbeddingComparisonRecord:
        return EmbeddingComparisonRecord(max_logit_error=self.max_logit_error, max_abs=self.max_abs,
                                         min_cosine=self.min_cosine)


def compare_embeddings(actual: np.ndarray, expected: np.ndarray, logit_scale: float) -> EmbeddingComparison:
    a, b = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    difference = a - b
    return EmbeddingComparison(
        max_logit_error=float(logit_scale * np.linalg.norm(difference, axis=1).max()),
        max_abs=float(np.abs(difference).max()),
        min_cosine=float((a * b).sum(axis=1).min()),
    )


def label_logit_error(actual: np.ndarray, expected: np.ndarray, texts: np.ndarray, logit_scale: float) -> float:
    """logit_scale · max |(a - e) · t| over images and `texts` [T, D]: the error of the
    logits those texts would get as request-time labels."""
    difference = np.asarray(actual, dtype=np.float64) - np.asarray(expected, dtype=np.float64)
    return float(logit_scale * np.abs(difference @ np.asarray(texts, dtype=np.float64).T).max())


@dataclass(frozen=True)
class TextVerification:
    precision: str
    tolerance: float  # on the logit-error bound
    strings: int
    text_vs_reference: EmbeddingComparison  # ONNX text encoder vs the unmerged reference's
    merged_torch_vs_reference: EmbeddingComparison
    text_vs_base: EmbeddingComparison | None  # how far the adapter moved the text embeddings
    image_embeds_vs_reference: EmbeddingComparison  # the published classifier's image_embeds
    image_label_logit_error: float  # label_logit_error against the verified strings' reference embeddings
    image_tolerance: float  # the classifier graph's tolerance (INT8's for cpu-int8)
    int8: bool  # cpu-int8: image_embeds are judged by image_label_logit_error
    tokenizer_matches: bool  # the ids fed to the ONNX text encoder (ours) are open_clip's, measured

    @property
    def failures(self) -> list[str]:
        problems = []
        image_error = self.image_label_logit_error if self.int8 else self.image_embeds_vs_reference.max_logit_error
        for what, error, bound in (("text embeddings", self.text_vs_reference.max_logit_error, self.tolerance),
                                   ("image_embeds", image_error, self.image_tolerance)):
            if error > bound:
                problems.append(f"ONNX {what} differ from the unmerged reference's by up to {error:.3g} in logits "
                                f"(tolerance {bound:g})")
        from cliplora.export.verify import FP32_TOLERANCE

        if self.merged_torch_vs_reference.max_logit_error > FP32_TOLERANCE:
            problems.append(f"the merged text encoder differs from the unmerged reference by up to "
                            f"{self.merged_torch_vs_reference.max_logit_error:.3g} in logits")
        if not self.tokenizer_matches:
            problems.append("the gateway's tokenizer gives other token ids than open_clip's for the verified "
                            "strings")
        return problems

    def record(self) -> TextVerificationRecord:
        return TextVerificationRecord(
            precision=self.precision, tolerance_abs_logit=self.tolerance, strings=self.strings,
            text_vs_reference=self.text_vs_reference.record(),
            merged_torch_vs_reference=self.merged_torch_vs_reference.record(),
            text_vs_base=self.text_vs_base.record() if self.text_vs_base else None,
            image_embeds_vs_reference=self.image_embeds_vs_reference.record(),
            image_label_logit_error=self.image_label_logit_error,
            image_embeds_tolerance_abs_logit=self.image_tolerance,
            tokenizer_matches=self.tokenizer_matches, passed=not self.failures,
        )


@torch.no_grad()
def text_embeddings(model: nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Unit text embeddings [N, D] of open_clip token ids from a PyTorch CLIP."""
    parts = [F.normalize(model.encode_text(tokens[i : i + batch_size]).float(), dim=-1)
             for i in range(0, len(tokens), batch_size)]
    return torch.cat(parts).numpy()


def run_text_encoder(path: Path, tokens: np.ndarray, precision: str, batch_size: int = 64) -> np.ndarray:
    """The exported text encoder in ONNX Runtime: int32 ids [N, 77] -> [N, D]."""
    session = create_session(path, precision=precision)
    parts = [session.run([contract.TEXT_OUTPUT_NAME], {contract.TEXT_INPUT_NAME: tokens[i : i + batch_size]})[0]
             for i in range(0, len(tokens), batch_size)]
    return np.concatenate(parts)
