"""``--open-vocabulary``: the merged text encoder ``<name>_text``, exported, verified and
described in the staging folder beside the classifier (the rules: `cliplora.export.open_vocabulary`).

The classifier is staged first: its published graph's ``image_embeds`` are verified here
too, so a cpu-int8 classifier is checked as the INT8 file it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cliplora.core import contract
from cliplora.core.errors import FailedPrecondition
from cliplora.core.manifest import OpenVocabularyRecord
from cliplora.core.progress import Progress
from cliplora.core.runtime import create_session, run_image_embeddings
from cliplora.export import manifests, open_vocabulary, quantize, verify
from cliplora.export.adapted import AdaptedModels
from cliplora.export.engine_key import stamp_engine_key
from cliplora.export.open_vocabulary import OpenVocabularyPlan, TextVerification
from cliplora.export.options import ExportOptions
from cliplora.model.graph import TextGraph, export_text_encoder

STAGED_FOLDER = "text-version"


@dataclass(frozen=True)
class StagedTextEncoder:
    """The text encoder's verified version folder, and what the classifier's manifest says of it."""

    folder: Path
    record: OpenVocabularyRecord


def stage_text_encoder(options: ExportOptions, models: AdaptedModels, plan: OpenVocabularyPlan,
                       classifier_path: Path, staging: Path, progress: Progress) -> StagedTextEncoder:
    """Export, key, verify and describe the merged text encoder; stops on any verification failure."""
    folder = staging / STAGED_FOLDER
    folder.mkdir()
    path = folder / contract.MODEL_FILENAME
    export_text_encoder(TextGraph(models.merged, options.precision), path, plan.tokenizer.start_token,
                        plan.tokenizer.end_token)
    engine_key = stamp_engine_key(path, contract.TEXT_OUTPUT_NAME) if options.target == "gpu" else None
    check = verify_text_encoder(options, models, plan, path, classifier_path)
    if check.failures:
        raise FailedPrecondition("text encoder verification failed, nothing published: " + "; ".join(check.failures))
    manifest = manifests.text_encoder_manifest(
        options, models.base, name=plan.text_model, tokenizer=open_vocabulary.tokenizer_record(plan.tokenizer),
        onnx=manifests.onnx_record(path, engine_key), verification=check.record())
    (folder / contract.MANIFEST_FILENAME).write_text(manifest.to_json(), encoding="utf-8")
    progress.info(f"text encoder {plan.text_model}: logit error bound ONNX vs reference "
                  f"{check.text_vs_reference.max_logit_error:.2e} over {len(plan.strings)} strings "
                  f"(tolerance {check.tolerance:g})")
    base = models.base
    return StagedTextEncoder(folder, OpenVocabularyRecord(
        text_model=plan.text_model, tokenizer=manifest.tokenizer, embedding_dim=base.embedding_dim,
        logit_scale=base.logit_scale, verification=manifest.verification))


@torch.no_grad()
def verify_text_encoder(options: ExportOptions, models: AdaptedModels, plan: OpenVocabularyPlan, path: Path,
                        classifier_path: Path) -> TextVerification:
    """The ONNX text encoder fed our tokenizer's ids, against the unmerged reference fed
    open_clip's; the published classifier's ``image_embeds`` against the reference's features."""
    base, scale = models.base, models.base.logit_scale
    strings = list(plan.strings)
    ours = plan.tokenizer(strings, contract.CONTEXT_LENGTH)  # what the gateway sends
    theirs = base.tokenizer(strings).numpy()  # open_clip's own ids: the reference path
    reference_tokens = torch.from_numpy(theirs.astype(np.int64))
    expected = open_vocabulary.text_embeddings(models.reference, reference_tokens)
    image_embeds, reference_images = _image_embeddings(options, models, classifier_path)
    compare = open_vocabulary.compare_embeddings
    return TextVerification(
        precision=options.precision,
        tolerance=verify.tolerance(options.precision, scale),
        strings=len(strings),
        text_vs_reference=compare(open_vocabulary.run_text_encoder(path, ours, options.precision), expected, scale),
        merged_torch_vs_reference=compare(open_vocabulary.text_embeddings(models.merged, reference_tokens),
                                          expected, scale),
        text_vs_base=compare(open_vocabulary.text_embeddings(base.model, reference_tokens), expected, scale)
        if models.merged is not base.model else None,
        image_embeds_vs_reference=compare(image_embeds, reference_images, scale),
        image_label_logit_error=open_vocabulary.label_logit_error(image_embeds, reference_images, expected, scale),
        image_tolerance=(quantize.INT8_COSINE_TOLERANCE * scale if options.int8
                         else verify.tolerance(options.precision, scale)),
        int8=options.int8,
        tokenizer_matches=bool(np.array_equal(ours, theirs)),
    )


def _image_embeddings(options: ExportOptions, models: AdaptedModels,
                      classifier_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The published classifier's ``image_embeds`` of the probes, and the reference's features of them."""
    base = models.base
    images = verify.probe_images(base.image_size, options.probes)
    classifier = create_session(classifier_path, precision=options.graph_precision)  # what is published
    image_embeds = run_image_embeddings(classifier, verify.product_inputs(images, base.image_size))
    return image_embeds, verify.reference_features(models.reference, images, base.image_size, base.mean, base.std)
