"""`cliplora bank create`: version 1 of a bank, the base model alone (adapter ``base``, slot 0).

The only step of a bank's life that runs the ONNX exporter: the bank graph
(`cliplora.model.bank_graph`) is exported once with one placeholder slot, its base
weights moved into the external-data file every later version hard-links, its factor
stacks zeroed (slot 0 is the base). ``--target cpu-int8`` quantizes the base weights as
`export --target cpu-int8` does (`cliplora.export.quantize`) and keeps the fp32 bank
beside it for each adapter's INT8 gate; the factor stacks and the branches stay fp32 (the
quantizer only takes MatMuls with a constant weight, and a branch's weight is gathered per
sample). ``--target gpu`` writes the TensorRT configuration of `export --target gpu`;
nothing of it has run on a GPU here. ``--open-vocabulary`` also exports the text tower as
``NAME_text`` (`cliplora.export.bank_text`), whose slot 0 is checked here too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import cliplora
from cliplora.core import contract, open_vocab
from cliplora.core.bank_manifest import (
    BankAdapterRecord,
    BankFilesRecord,
    BankManifest,
    BankSettingsRecord,
    BaseVerificationRecord,
)
from cliplora.core.errors import FailedPrecondition
from cliplora.core.manifest import GpuServingRecord, QuantizationRecord
from cliplora.core.progress import Progress
from cliplora.core.repository import ModelRepository
from cliplora.core.tokenizer import ClipTokenizer
from cliplora.export import (
    bank_companion,
    bank_source,
    bank_store,
    bank_text,
    bank_verify,
    bank_version,
    open_vocabulary,
    publish,
    quantize,
    verify,
)
from cliplora.export.bank_options import BankOptions
from cliplora.model import head
from cliplora.model.bank_adapters import class_embeddings
from cliplora.model.bank_graph import BANK_MATRICES, BankGraph, export_bank
from cliplora.model.base_model import BaseModel


@dataclass(frozen=True)
class BankResult:
    name: str
    version: int
    path: Path
    manifest: BankManifest


def check_new(root: Path, name: str, open_vocabulary: bool = False) -> None:
    """A bank is created under a name nothing in `root` uses yet (nor its companion's, nor
    with `open_vocabulary` its text encoder's)."""
    models = ModelRepository(root).model_names()
    if name in models or ModelRepository(root).versions(name):
        kind = "a bank: add adapters with `cliplora bank add`" if publish.is_bank(root, name) else \
            "a model that is not a bank: create the bank under another name"
        raise FailedPrecondition(f"{root} already has {name!r}, {kind}; nothing published")
    publish.preflight(root, name, "")
    publish.check_names(root, name, open_vocabulary, bank=True)


def create_bank(options: BankOptions, progress: Progress | None = None) -> BankResult:
    """Export, verify and publish version 1 of a bank; raises a `CliploraError` on any fault."""
    progress = progress or Progress(quiet=True)
    started = time.perf_counter()
    classes = head.read_classes(options.classes) if options.classes else []
    templates = head.validate_templates(options.templates)
    root, name = options.repository, options.name
    check_new(root, name, options.open_vocabulary)
    with publish.model_lock(root, name, bank_version.LOCK_PURPOSE):
        check_new(root, name, options.open_vocabulary)
        with progress.step(f"loading base model {options.model}"):
            base, source = bank_source.load_source(options.model, options.pretrained, options.allow_random_weights)
        if base.weights.kind == "random":
            progress.warn("RANDOM weights (--allow-random-weights): this bank is for tests and demos only")
        tokenizer = open_vocabulary.check_tokenizer(
            base.tokenizer, [*open_vocab.prompts(classes, templates), *open_vocabulary.PROBE_STRINGS]) \
            if options.open_vocabulary else None
        settings = _settings(options, base, tokenizer)
        with publish.staging_area() as staging:
            folder = staging / "version"
            folder.mkdir()
            files, quantization = _write_first_version(base, settings, staging, folder, progress)
            text = bank_text.stage_first(base, settings, tokenizer, staging, progress) if tokenizer else None
            with progress.step(f"verifying the base slot against the reference ({options.probes} probe images)"):
                class_embeds = class_embeddings(base.model, None, base.tokenizer, classes, templates)
                reference = bank_verify.Reference(base.model)  # one copy of the base for both towers' checks
                check = _verify_base(base, reference, folder, options.probes, class_embeds,
                                     settings.target == "cpu-int8")
                check = bank_text.check_base(text, base, classes, templates, check, reference)
            slots = bank_version.Slots(bank_store.read_stacks(folder),
                                       [bank_companion.SlotClasses(classes, class_embeds)],
                                       bank_store.read_stacks(text.folder) if text else {})
            manifest = BankManifest(
                cliplora_version=cliplora.__version__, name=name, version=1, created=bank_version.now(),
                change="create", source=source, settings=settings,
                adapters=[BankAdapterRecord(adapter=contract.BASE_ADAPTER, slot=contract.BASE_SLOT, version_added=1,
                                            classes=classes, templates=templates, lora=None, rank=0, matrices=[],
                                            encoders=[], verification=None)],
                retired=[], files=bank_text.with_files(files, text), base_verification=check, quantization=quantization,
                gpu_serving=_gpu_record(base) if settings.target == "gpu" else None,
                environment=bank_version.environment(), seconds=round(time.perf_counter() - started, 2))
            with progress.step(f"publishing bank {name} and {contract.adapters_model_name(name)}"
                               f"{f' and {contract.text_model_name(name)}' if text else ''} to {root}"):
                version = bank_version.publish_bank(root, manifest, slots, staging,
                                                    companions=bank_text.companions(manifest, text))
    return BankResult(name, version, root / name / str(version), manifest)


def _settings(options: BankOptions, base: BaseModel, tokenizer: ClipTokenizer | None) -> BankSettingsRecord:
    """What the bank fixes for its life; `tokenizer`: open vocabulary's, checked against the base's."""
    return BankSettingsRecord(
        max_rank=options.max_rank, matrices=[m for m in BANK_MATRICES if m in options.matrices],
        target=options.target, precision="int8" if options.target == "cpu-int8" else "fp32",
        max_batch_size=options.max_batch_size, image_size=base.image_size, embedding_dim=base.embedding_dim,
        logit_scale=base.logit_scale, vision_blocks=len(base.vision_blocks), open_vocabulary=tokenizer is not None,
        tokenizer=open_vocabulary.tokenizer_record(tokenizer) if tokenizer else None)


def _write_first_version(base: BaseModel, settings: BankSettingsRecord, staging: Path, folder: Path,
                         progress: Progress) -> tuple[BankFilesRecord, QuantizationRecord | None]:
    """Export the bank graph and lay out version 1's files in `folder`."""
    exported = staging / "bank.onnx"
    with progress.step(f"exporting the bank graph (rank {settings.max_rank}, {','.join(settings.matrices)} in "
                       f"{settings.vision_blocks} vision blocks)"):
        graph = BankGraph(base.model, settings.matrices, settings.max_rank, base.mean, base.std)
        names = export_bank(graph, base.image_size, exported)
    quantization = fp32_sha = None
    if settings.target == "cpu-int8":
        with progress.step("quantizing the base weights to INT8 (dynamic, per channel; branches stay fp32)"):
            quantized = staging / "bank.int8.onnx"
            quantization = quantize.quantize(exported, quantized)
            fp32_sha = bank_store.split_weights(onnx.load(str(exported)), names, folder, bank_store.FP32_FILES)[0].sha256
            exported = quantized
    base_file, factors = bank_store.split_weights(onnx.load(str(exported)), names, folder)
    key = None
    if settings.target == "gpu":
        key = bank_version.engine_key(base_file.sha256, factors.sha256)
        bank_store.stamp_graph(folder, key)
    return bank_version.files_record(folder, base_file, factors, 1, key, fp32_sha), quantization


def _verify_base(base: BaseModel, reference: bank_verify.Reference, folder: Path, count: int,
                 class_embeds: np.ndarray, int8: bool) -> BaseVerificationRecord:
    sample = bank_verify.probes(base.image_size, count)
    fp32, int8_session = bank_version.sessions(folder, folder, int8)
    slots = [contract.BASE_SLOT] * len(sample.crops)
    embeds = bank_verify.embed(fp32, sample.crops, slots)
    int8_embeds = bank_verify.embed(int8_session, sample.crops, slots) if int8_session else None
    check = bank_verify.check_base(base, reference, sample, embeds, class_embeds, int8_embeds)
    if not check.passed:
        raise FailedPrecondition(f"the bank's base slot differs from the base model by {check.embeds_logit_error:.3g} "
                                 f"in logits (tolerance {check.tolerance_abs_logit:g})"
                                 f"{'' if check.int8_gate is None or check.int8_gate.passed else ' or fails the INT8 gate'}"
                                 "; nothing published")
    return check


def _gpu_record(base: BaseModel) -> GpuServingRecord:
    return GpuServingRecord(engine="TensorRT", engine_precision="fp16",
                            expected_tolerance_abs_logit=verify.tolerance("fp16", base.logit_scale), verified_here=False)
