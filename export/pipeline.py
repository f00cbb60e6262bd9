"""`cliplora export`: the stages in order, from checkpoint to published model version."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import cliplora
from cliplora.core import contract, open_vocab
from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.core.hashing import sha256_file
from cliplora.core.manifest import (
    EnvironmentRecord,
    GpuServingRecord,
    Manifest,
    MergeRecord,
    NoLoraRecord,
    OnnxRecord,
    OpenVocabularyRecord,
    QuantizationRecord,
    TensorRecord,
    TensorsRecord,
    TextEncoderManifest,
    TextTensorsRecord,
)
from cliplora.core.progress import Progress
from cliplora.core.repository import render_labels, validate_model_name
from cliplora.core.runtime import create_session, run_logits
from cliplora.core.tokenizer import ClipTokenizer
from cliplora.export import open_vocabulary, publish, quantize, verify
from cliplora.export.engine_key import stamp_engine_key
from cliplora.export.model_config import (
    TARGETS,
    OpenVocabularyParameters,
    RuntimeParameters,
    model_config,
    text_model_config,
)
from cliplora.model import head
from cliplora.model.base_model import BaseModel, load_base_model
from cliplora.model.graph import (
    EXPORTER,
    OPSET,
    PRECISIONS,
    ClassifierGraph,
    TextGraph,
    export_classifier,
    export_text_encoder,
)
from cliplora.model.lora import load_adapter
from cliplora.model.merge import merge_adapter
from cliplora.model.reference import build_reference


@dataclass(frozen=True)
class ExportOptions:
    """Everything `cliplora export` takes (the README's "Export" table)."""

    model: str
    pretrained: str | None
    lora: str
    classes: Path
    templates: tuple[str, ...]
    name: str
    repository: Path = Path("model_repository")
    precision: str = "fp32"
    target: str = "portable"  # "gpu": TensorRT FP16, engine cache and warm-up in config.pbtxt
    unmerged: bool = False
    allow_random_weights: bool = False
    max_batch_size: int = contract.DEFAULT_MAX_BATCH_SIZE
    probes: int = verify.DEFAULT_PROBES
    open_vocabulary: bool = False  # also publish the adapted text encoder as <name>_text
    calibration: Path | None = None  # cpu-int8: more images for the accuracy gate
    intra_op_threads: int | None = None  # ONNX Runtime model parameters (export/model_config.py)
    inter_op_threads: int | None = None
    spinning: str | None = None  # auto | on | off

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        if self.precision not in PRECISIONS:
            raise InvalidArgument(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.target not in TARGETS:
            raise InvalidArgument(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not 1 <= self.max_batch_size <= 1024:
            raise InvalidArgument(f"max batch size must be 1..1024, got {self.max_batch_size}")
        if self.probes < 1:
            raise InvalidArgument("at least one probe image is needed")
        if self.target == "cpu-int8" and self.precision != "fp32":
            raise InvalidArgument("--target cpu-int8 quantizes the fp32 graph to INT8: it does not go with "
                                  f"--precision {self.precision}")
        if self.calibration is not None and self.target != "cpu-int8":
            raise InvalidArgument("--calibration feeds the INT8 accuracy gate: it goes with --target cpu-int8")
        try:
            RuntimeParameters(self.intra_op_threads, self.inter_op_threads, self.spinning)
        except ValueError as exc:
            raise InvalidArgument(str(exc).replace("_", "-").replace("intra-op-threads", "--intra-op-threads")
                                  .replace("inter-op-threads", "--inter-op-threads")) from None

    @property
    def runtime(self) -> RuntimeParameters:
        return RuntimeParameters(self.intra_op_threads, self.inter_op_threads, self.spinning)

    @property
    def graph_precision(self) -> str:
        """What the published graph computes in: int8 for cpu-int8, else --precision."""
        return "int8" if self.target == "cpu-int8" else self.precision


@dataclass(frozen=True)
class ExportResult:
    name: str
    version: int
    path: Path
    manifest: Manifest = field(repr=False)
    text_path: Path | None = None  # `--open-vocabulary`: the text encoder's version folder


@torch.no_grad()  # a scope, not the process-wide switch: callers (finetune, tests) train afterwards
def run_export(options: ExportOptions, progress: Progress | None = None) -> ExportResult:
    """Merge, fold, export, verify and publish; raises a `CliploraError` on any fault."""
    progress = progress or Progress(quiet=True)
    started = time.perf_counter()
    classes = head.read_classes(options.classes)
    templates = head.validate_templates(options.templates)
    labels = render_labels(classes)
    publish.preflight(options.repository, options.name, labels)
    publish.check_names(options.repository, options.name, options.open_vocabulary)

    with progress.step(f"loading base model {options.model}"):
        base = load_base_model(options.model, options.pretrained, allow_random_weights=options.allow_random_weights)
    if base.weights.kind == "random":
        progress.warn("exporting RANDOM weights (--allow-random-weights): this model is for tests and demos only")
    progress.info(f"activation {'QuickGELU' if base.quick_gelu else 'GELU'}, image size {base.image_size}, "
                  f"logit scale {base.logit_scale:.4g}")
    text_name = tokenizer = None
    text_strings: list[str] = []
    if options.open_vocabulary:
        text_name = contract.text_model_name(options.name)
        # The strings the text encoder is verified on: the model's own prompts, then the probes.
        text_strings = [*open_vocab.prompts(classes, templates), *open_vocabulary.PROBE_STRINGS]
        tokenizer = open_vocabulary.check_tokenizer(base.tokenizer, text_strings)
    spec = contract.TensorSpec(image_size=base.image_size, num_classes=len(classes),
                               embedding_dim=base.embedding_dim if options.open_vocabulary else None)
    ov_parameters = OpenVocabularyParameters(text_name, base.logit_scale, tuple(templates), tokenizer.vocab_sha256) \
        if text_name and tokenizer else None
    config = model_config(options.name, spec, options.graph_precision, options.max_batch_size, options.target,
                          ov_parameters, options.runtime)
    publish.check_compatible(options.repository, options.name, config, labels)
    text_config = None
    if text_name and tokenizer:
        text_config = text_model_config(text_name, options.name, base.embedding_dim, options.precision,
                                        options.max_batch_size, options.target, vocab_sha256=tokenizer.vocab_sha256,
                                        runtime=options.runtime)
        publish.check_compatible(options.repository, text_name, text_config, "")

    with progress.step(f"reading adapter {options.lora}"):
        adapter = load_adapter(options.lora, len(base.text_blocks), len(base.vision_blocks))
    if adapter:
        progress.info(f"{adapter.format}: {len(adapter.updates)} updates, r={adapter.rank}, "
                      f"alpha={adapter.alpha:g}, scale {adapter.scaling}")
        with progress.step("merging W' = W + s·B·A (fp32)"):
            merged, merge_report = merge_adapter(base.model, adapter)
    else:
        merged, merge_report = base.model, None
    reference = build_reference(base.model, adapter)

    n_prompts = len(classes) * len(templates)
    with progress.step(f"encoding {n_prompts} prompts with the adapted text encoder"):
        tokens = head.prompt_tokens(base.tokenizer, classes, templates)
        text_matrix = head.text_matrix(merged, tokens, len(classes))
        reference_text = head.text_matrix(reference, tokens, len(classes))
        base_text = head.text_matrix(base.model, tokens, len(classes)) if adapter else None

    merge_mode = "unmerged" if options.unmerged else ("merged" if adapter else "base")
    exported_visual = reference.visual if options.unmerged else merged.visual
    graph = ClassifierGraph(exported_visual, text_matrix, base.logit_scale, base.mean, base.std, options.precision,
                            embeddings=options.open_vocabulary)
    with publish.staging_area() as staging:
        staged = staging / "version"
        staged.mkdir()
        onnx_path = staged / contract.MODEL_FILENAME
        int8 = options.target == "cpu-int8"
        fp32_path = staging / "model.fp32.onnx" if int8 else onnx_path  # cpu-int8: quantized after verification
        with progress.step(f"exporting ONNX ({options.precision}{', unmerged branches' if options.unmerged else ''})"):
            export_classifier(graph, base.image_size, fp32_path)
        engine_key = None
        if options.target == "gpu":
            with progress.step("keying the TensorRT engine cache to these weights"):
                engine_key = stamp_engine_key(onnx_path)

        with progress.step(f"verifying against the unmerged PyTorch reference ({options.probes} probe images)"):
            verification = _verify(options, base, merged, reference, text_matrix, reference_text, base_text, fp32_path)
        if verification.failures:
            raise FailedPrecondition("verification failed, nothing published: " + "; ".join(verification.failures))
        progress.info(
            f"max |Δlogit| ONNX vs reference {verification.onnx_vs_reference.max_abs_logit:.2e} "
            f"(tolerance {verification.tolerance:g}), top-1 agreement "
            f"{verification.onnx_vs_reference.top1_agreement:.0%}"
        )
        quantization = None
        if int8:
            quantization = _quantize(options, base, fp32_path, onnx_path, progress)
        companions: list[publish.StagedModel] = []
        ov_record = None
        if text_name and tokenizer and text_config is not None:
            text_staged = staging / "text-version"
            text_staged.mkdir()
            text_verification, text_manifest = _export_text_encoder(
                options, base, merged, reference, onnx_path, text_staged, text_strings, tokenizer, text_name)
            progress.info(f"text encoder {text_name}: logit error bound ONNX vs reference "
                          f"{text_verification.text_vs_reference.max_logit_error:.2e} over {len(text_strings)} strings "
                          f"(tolerance {text_verification.tolerance:g})")
            companions.append(publish.StagedModel(text_name, text_staged, text_config, text_encoder=True))
            ov_record = OpenVocabularyRecord(text_model=text_name, tokenizer=text_manifest.tokenizer,
                                             embedding_dim=base.embedding_dim, logit_scale=base.logit_scale,
                                             verification=text_manifest.verification)

        manifest = Manifest(
            schema_version=Manifest.schema_versions[-1],
            cliplora_version=cliplora.__version__,
            name=options.name,
            version=None,  # stamped under the publish lock
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            base=base.record(),
            lora=adapter.record() if adapter else NoLoraRecord(format="none"),
            merge=(merge_report.record(merge_mode) if merge_report else MergeRecord(mode=merge_mode)),
            classes=classes,
            templates=templates,
            precision=options.graph_precision,
            target=options.target,
            **({"gpu_serving": GpuServingRecord(
                engine="TensorRT", engine_precision="fp16",
                # What the FP16 engine may differ by from the verified ONNX file (the fp16
                # rule of export/verify.py); the engine itself is built on the GPU server,
                # so this export cannot check it: deploy/compose/smoke_test.sh does there.
                expected_tolerance_abs_logit=verify.tolerance("fp16", base.logit_scale),
                verified_here=False,
            )} if options.target == "gpu" else {}),
            tensors=TensorsRecord(
                input=TensorRecord(name=contract.INPUT_NAME, dtype=contract.INPUT_WIRE_DTYPE,
                                   shape=[-1, *spec.input_shape]),
                output=TensorRecord(name=contract.OUTPUT_NAME, dtype=contract.OUTPUT_WIRE_DTYPE,
                                    shape=[-1, *spec.output_shape]),
                **({"embeddings": TensorRecord(name=contract.EMBEDS_NAME, dtype=contract.OUTPUT_WIRE_DTYPE,
                                               shape=[-1, spec.embedding_dim])} if spec.embedding_dim else {}),
            ),
            onnx=_onnx_record(onnx_path, engine_key),
            verification=verification.record(),
            environment=EnvironmentRecord(python=platform.python_version(), torch=torch.__version__),
            export_seconds=round(time.perf_counter() - started, 2),
            **({"open_vocabulary": ov_record} if ov_record else {}),
            **({"quantization": quantization} if quantization else {}),
        )
        (staged / contract.MANIFEST_FILENAME).write_text(manifest.to_json(), encoding="utf-8")
        with progress.step(f"publishing {options.name}{f' and {text_name}' if text_name else ''} to {options.repository}"):
            version = publish.publish_version(options.repository, options.name, staged, config=config, labels=labels,
                                              companions=companions)
    return ExportResult(options.name, version, options.repository / options.name / str(version),
                        manifest.model_copy(update={"version": version}),
                        options.repository / text_name / str(version) if text_name else None)


def _quantize(options: ExportOptions, base: BaseModel, fp32_path: Path, int8_path: Path,
              progress: Progress) -> QuantizationRecord:
    """The INT8 graph of the verified fp32 one, published only past its gate."""
    calibration = quantize.calibration_inputs(options.calibration, base.image_size)
    with progress.step("quantizing the image tower to INT8 (dynamic, per channel)"):
        record = quantize.quantize(fp32_path, int8_path)
    probes = verify.product_inputs(verify.probe_images(base.image_size, options.probes), base.image_size)
    n = len(probes) + (0 if calibration is None else len(calibration))
    with progress.step(f"INT8 accuracy gate against the fp32 graph ({n} images)"):
        result = quantize.gate(fp32_path, int8_path, probes, calibration, base.logit_scale)
    if result.failures:
        raise FailedPrecondition("INT8 accuracy gate failed, nothing published: " + "; ".join(result.failures))
    progress.info(f"INT8 vs fp32: top-1 agreement {result.top1_agreement:.1%} of {result.images} images, "
                  f"max |Δlogit| {result.max_abs_logit:.3g} (tolerance {result.tolerance:g})")
    return quantize.with_gate(record, result)


def _onnx_record(path: Path, engine_key: str | None) -> OnnxRecord:
    return OnnxRecord(
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        opset=OPSET,
        exporter=EXPORTER,
        onnxruntime_version=onnxruntime.__version__,
        **({"tensorrt_engine_key": engine_key} if engine_key else {}),
    )


def _export_text_encoder(
    options: ExportOptions,
    base: BaseModel,
    merged: torch.nn.Module,
    reference: torch.nn.Module,
    classifier_path: Path,
    staged: Path,
    strings: list[str],
    tokenizer: ClipTokenizer,
    name: str,
) -> tuple[open_vocabulary.TextVerification, TextEncoderManifest]:
    """Export, key, verify and describe the merged text encoder in `staged`."""
    path = staged / contract.MODEL_FILENAME
    export_text_encoder(TextGraph(merged, options.precision), path, tokenizer.start_token, tokenizer.end_token)
    engine_key = stamp_engine_key(path, contract.TEXT_OUTPUT_NAME) if options.target == "gpu" else None
    tokens = tokenizer(strings, contract.CONTEXT_LENGTH)
    torch_tokens = torch.from_numpy(tokens.astype(np.int64))
    expected = open_vocabulary.text_embeddings(reference, torch_tokens)
    scale = base.logit_scale
    images = verify.probe_images(base.image_size, options.probes)
    classifier = create_session(classifier_path, precision=options.graph_precision)  # what is published
    image_embeds = classifier.run([contract.EMBEDS_NAME],
                                  {contract.INPUT_NAME: verify.product_inputs(images, base.image_size)})[0]
    reference_images = verify.reference_features(reference, images, base.image_size, base.mean, base.std)
    result = open_vocabulary.TextVerification(
        precision=options.precision,
        tolerance=verify.tolerance(options.precision, scale),
        strings=len(strings),
        text_vs_reference=open_vocabulary.compare_embeddings(
            open_vocabulary.run_text_encoder(path, tokens, options.precision), expected, scale),
        merged_torch_vs_reference=open_vocabulary.compare_embeddings(
            open_vocabulary.text_embeddings(merged, torch_tokens), expected, scale),
        text_vs_base=open_vocabulary.compare_embeddings(
            open_vocabulary.text_embeddings(base.model, torch_tokens), expected, scale) if merged is not base.model else None,
        image_embeds_vs_reference=open_vocabulary.compare_embeddings(image_embeds, reference_images, scale),
        image_label_logit_error=open_vocabulary.label_logit_error(image_embeds, reference_images, expected, scale),
        image_tolerance=(quantize.INT8_COSINE_TOLERANCE * scale if options.target == "cpu-int8"
                         else verify.tolerance(options.precision, scale)),
        int8=options.target == "cpu-int8",
        tokenizer_matches=True,  # check_tokenizer already refused any disagreement
    )
    if result.failures:
        raise FailedPrecondition("text encoder verification failed, nothing published: " + "; ".join(result.failures))
    manifest = TextEncoderManifest(
        schema_version=TextEncoderManifest.schema_versions[-1],
        cliplora_version=cliplora.__version__,
        name=name,
        classifier=options.name,
        version=None,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        precision=options.precision,
        target=options.target,
        tokenizer=open_vocabulary.tokenizer_record(tokenizer),
        embedding_dim=base.embedding_dim,
        tensors=TextTensorsRecord(
            input=TensorRecord(name=contract.TEXT_INPUT_NAME, dtype=contract.TEXT_INPUT_WIRE_DTYPE,
                               shape=[-1, contract.CONTEXT_LENGTH]),
            output=TensorRecord(name=contract.TEXT_OUTPUT_NAME, dtype=contract.OUTPUT_WIRE_DTYPE,
                                shape=[-1, base.embedding_dim]),
        ),
        onnx=_onnx_record(path, engine_key),
        verification=result.record(),
    )
    (staged / contract.MANIFEST_FILENAME).write_text(manifest.to_json(), encoding="utf-8")
    return result, manifest


def _verify(
    options: ExportOptions,
    base: BaseModel,
    merged: torch.nn.Module,
    reference: torch.nn.Module,
    text_matrix: torch.Tensor,
    reference_text: torch.Tensor,
    base_text: torch.Tensor | None,
    onnx_path: Path,
) -> verify.Verification:
    images = verify.probe_images(base.image_size, options.probes)
    session = create_session(onnx_path, precision=options.precision)
    onnx_logits = run_logits(session, verify.product_inputs(images, base.image_size))

    def torch_logits(model: torch.nn.Module, texts: torch.Tensor) -> np.ndarray:
        return verify.reference_logits(model, texts, base.logit_scale, images, base.image_size, base.mean, base.std)

    expected = torch_logits(reference, reference_text)
    bound = verify.tolerance(options.precision, base.logit_scale)
    merged_logits = torch_logits(merged, text_matrix) if base_text is not None else None
    base_logits = torch_logits(base.model, base_text) if base_text is not None else None
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
