"""`cliplora export`: the stages in order, from checkpoint to published model version.

`run_export` is the list of the stages; each is a function of its own module:

1. plan: classes and templates read and checked, the repository checked writable and
   compatible, the configs built, the ``--open-vocabulary`` plan made (`plan_export`);
2. load the base model (`cliplora.model.base_model`);
3. read the adapter, merge it, build the unmerged reference (`cliplora.export.adapted`); for
   `cliplora bank promote`, check it is the content its bank holds (`check_promoted_adapter`);
4. fold the class heads (`cliplora.export.adapted.fold_heads`);
5. export the classifier graph, verify it, quantize it for cpu-int8 (`cliplora.export.classifier`);
6. the open-vocabulary companion `<name>_text` (`cliplora.export.text_encoder`);
7. the manifest (`cliplora.export.manifests`);
8. publish, atomically (`cliplora.export.publish`).

Everything before 8 happens in a private staging folder; a failure anywhere leaves the
repository as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cliplora.core import contract
from cliplora.core.errors import FailedPrecondition
from cliplora.core.manifest import Manifest
from cliplora.core.progress import Progress
from cliplora.core.repository import render_labels
from cliplora.export import publish
from cliplora.export.adapted import AdaptedModels, adapt, fold_heads
from cliplora.export.classifier import (
    StagedClassifier,
    quantize_classifier,
    verify_classifier,
    write_classifier,
)
from cliplora.export.manifests import build_manifest, onnx_record
from cliplora.export.model_config import ModelConfig, model_config
from cliplora.export.open_vocabulary import OpenVocabularyPlan, plan_open_vocabulary
from cliplora.export.options import ExportOptions
from cliplora.export.text_encoder import StagedTextEncoder, stage_text_encoder
from cliplora.model import head
from cliplora.model.base_model import BaseModel, load_base_model

__all__ = ["ExportOptions", "ExportPlan", "ExportResult", "run_export"]


@dataclass(frozen=True)
class ExportResult:
    name: str
    version: int
    path: Path
    manifest: Manifest = field(repr=False)
    text_path: Path | None = None  # `--open-vocabulary`: the text encoder's version folder


@dataclass(frozen=True)
class ClassNames:
    """The classes and templates the head is folded from, checked."""

    classes: list[str]
    templates: list[str]
    labels: str  # labels.txt


@dataclass(frozen=True)
class ExportPlan:
    """What the export will publish, checked against the repository before anything slow runs."""

    names: ClassNames
    spec: contract.TensorSpec
    config: ModelConfig  # the classifier's config.pbtxt
    vocabulary: OpenVocabularyPlan | None  # None without --open-vocabulary


@torch.no_grad()  # a scope, not the process-wide switch: callers (finetune, tests) train afterwards
def run_export(options: ExportOptions, progress: Progress | None = None,
               base: BaseModel | None = None) -> ExportResult:
    """Merge, fold, export, verify and publish; raises a `CliploraError` on any fault.

    `base`: the base model `options.model`/`options.pretrained` name, already loaded and
    checked by the caller (`cliplora bank promote` loads its bank's, checked against the bank's record)."""
    progress = progress or Progress(quiet=True)
    started = time.perf_counter()
    names = read_names(options)
    base = load_base(options, progress, base)
    plan = plan_export(options, names, base)
    models = adapt(options.lora, base, progress)
    check_promoted_adapter(options, models)
    heads = fold_heads(models, names.classes, names.templates, progress)
    with publish.staging_area() as staging:
        classifier = write_classifier(options, models, heads, staging, progress)
        verification = verify_classifier(options, models, heads, classifier, progress)
        quantization = quantize_classifier(options, models, classifier, progress) if options.int8 else None
        text = (stage_text_encoder(options, models, plan.vocabulary, classifier.path, staging, progress)
                if plan.vocabulary else None)
        manifest = build_manifest(
            options, models, classes=names.classes, templates=names.templates, spec=plan.spec,
            onnx=onnx_record(classifier.path, classifier.engine_key), verification=verification,
            quantization=quantization, open_vocabulary=text.record if text else None,
            export_seconds=round(time.perf_counter() - started, 2))
        version = publish_export(options, plan, classifier, manifest, text, progress)
    return _result(options, plan, manifest, version)


def read_names(options: ExportOptions) -> ClassNames:
    """Classes and templates, and the checks that need no model: a writable repository
    holding no other classes under this name, and names no text encoder reserves."""
    classes = head.read_classes(options.classes)
    templates = head.validate_templates(options.templates)
    labels = render_labels(classes)
    publish.preflight(options.repository, options.name, labels)
    publish.check_names(options.repository, options.name, options.open_vocabulary, promotion=options.promotion)
    return ClassNames(classes, templates, labels)


def load_base(options: ExportOptions, progress: Progress, loaded: BaseModel | None = None) -> BaseModel:
    if loaded is not None:
        base = loaded
    else:
        with progress.step(f"loading base model {options.model}"):
            base = load_base_model(options.model, options.pretrained, allow_random_weights=options.allow_random_weights)
    if base.weights.kind == "random":
        progress.warn("exporting RANDOM weights (--allow-random-weights): this model is for tests and demos only")
    progress.info(f"activation {'QuickGELU' if base.quick_gelu else 'GELU'}, image size {base.image_size}, "
                  f"logit scale {base.logit_scale:.4g}")
    return base


def check_promoted_adapter(options: ExportOptions, models: AdaptedModels) -> None:
    """`cliplora bank promote`: the adapter read is the content its bank holds (the published
    config names that content; the gateway routes to it only while the bank holds the same)."""
    promotion = options.promotion
    if promotion is None:
        return
    found = models.adapter.sha256 if models.adapter is not None else ""
    if found != promotion.lora_sha256:
        raise FailedPrecondition(f"the adapter {options.lora} read for {options.name!r} (sha256 {found[:12]}) is not "
                                 f"the content adapter {promotion.adapter!r} of bank {promotion.bank!r} holds "
                                 f"(sha256 {promotion.lora_sha256[:12]}); nothing published")


def plan_export(options: ExportOptions, names: ClassNames, base: BaseModel) -> ExportPlan:
    """The tensors and configs of what will be published, each checked against the model of
    that name already in the repository (a new version must keep its configuration)."""
    vocabulary = plan_open_vocabulary(options, base, names.classes, names.templates)
    spec = contract.TensorSpec(image_size=base.image_size, num_classes=len(names.classes),
                               embedding_dim=base.embedding_dim if vocabulary else None)
    config = model_config(options.name, spec, options.graph_precision, options.max_batch_size, options.target,
                          vocabulary.parameters if vocabulary else None, options.runtime, options.promotion)
    publish.check_compatible(options.repository, options.name, config, names.labels)
    if vocabulary:
        publish.check_compatible(options.repository, vocabulary.text_model, vocabulary.config, "")
    return ExportPlan(names, spec, config, vocabulary)


def publish_export(options: ExportOptions, plan: ExportPlan, classifier: StagedClassifier, manifest: Manifest,
                   text: StagedTextEncoder | None, progress: Progress) -> int:
    """Write the manifest into the staged version and move it (and its text encoder) in."""
    (classifier.folder / contract.MANIFEST_FILENAME).write_text(manifest.to_json(), encoding="utf-8")
    companions = [publish.StagedModel(plan.vocabulary.text_model, text.folder, plan.vocabulary.config,
                                      text_encoder=True)] if text and plan.vocabulary else []
    also = f" and {plan.vocabulary.text_model}" if plan.vocabulary else ""
    with progress.step(f"publishing {options.name}{also} to {options.repository}"):
        return publish.publish_version(options.repository, options.name, classifier.folder, config=plan.config,
                                       labels=plan.names.labels, companions=companions)


def _result(options: ExportOptions, plan: ExportPlan, manifest: Manifest, version: int) -> ExportResult:
    text_path = options.repository / plan.vocabulary.text_model / str(version) if plan.vocabulary else None
    return ExportResult(options.name, version, options.repository / options.name / str(version),
                        manifest.model_copy(update={"version": version}), text_path)
