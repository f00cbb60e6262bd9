"""ONNX Runtime sessions for exported models, the same way everywhere.

fp16 graphs are created with ``ORT_ENABLE_EXTENDED`` optimisations: on the CPU
provider (onnxruntime 1.32) the layout optimisations of ``ORT_ENABLE_ALL`` crash the
process while creating a session for a half-precision ViT. fp32 graphs get
``ORT_ENABLE_ALL``, as Triton's native ONNX Runtime backend does (int8 graphs too). Idle
threads do not spin-wait: spinning threads slow every other process on a small machine
(a gateway, a Triton beside a load generator) for a gain within noise.

**Providers.** ``onnxruntime`` (CPU, the ``cpu`` extra) and ``onnxruntime-gpu`` (CUDA, the
``gpu`` extra) install the same module, so exactly one of them may be installed; with
both, the module is whichever came last, and sessions fail with a message that says how
to mend it (`check_installation`). A session runs on CUDA when the device is ``auto``
(the default; ``CLIPLORA_DEVICE`` says otherwise) and this ONNX Runtime has the CUDA
provider, and on the CPU otherwise, so `cliplora predict`, `evaluate` and the export's
verification use a GPU host's GPU without a flag; ``cuda`` without the provider is an error.
``onnxruntime-gpu`` lists the CUDA provider even on a host whose GPU or CUDA libraries are
missing, and then quietly builds a CPU session: so the session's own providers are
checked, and a session that asked for CUDA and got none is an error for ``cuda`` and a
logged fallback for ``auto``. CUDA sessions run fp32 as fp32 (``use_tf32`` off): the
export's verification holds graphs to 1e-5-scale tolerances that TF32's 10-bit mantissa
would not meet.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cliplora.core import contract, open_vocab
from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.core.manifest import TextEncoderManifest
from cliplora.core.repository import ModelRepository, ModelVersion
from cliplora.core.tokenizer import ClipTokenizer, get_tokenizer

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CUDA_OPTIONS = {"use_tf32": "0"}  # fp32 graphs in full fp32 on Ampere and later
DEVICE_ENV = "CLIPLORA_DEVICE"
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def installed_runtimes(distribution: object = metadata.distribution) -> list[str]:
    """The ONNX Runtime wheels installed here (normally exactly one)."""
    found = []
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            distribution(name)  # type: ignore[operator]
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def check_installation(runtimes: Sequence[str]) -> None:
    """FailedPrecondition unless exactly one ONNX Runtime wheel is installed."""
    if len(runtimes) > 1:
        raise FailedPrecondition(
            "both onnxruntime and onnxruntime-gpu are installed; they provide the same module and clash. "
            "Keep one: pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'cliplora[cpu]' "
            "(or 'cliplora[gpu]' on a CUDA host)")
    if not runtimes:
        raise FailedPrecondition("ONNX Runtime is not installed: pip install 'cliplora[cpu]' (or 'cliplora[gpu]')")


@cache
def _checked() -> bool:
    check_installation(installed_runtimes())
    return True


def resolve_device(device: str | None = None) -> str:
    """`device`, else ``CLIPLORA_DEVICE``, else ``auto``; InvalidArgument for another name."""
    device = (device or os.environ.get(DEVICE_ENV) or "auto").lower()
    if device not in DEVICES:
        raise InvalidArgument(f"device must be one of {', '.join(DEVICES)}, got {device!r} ({DEVICE_ENV}?)")
    return device


def preferred_providers(device: str | None = None, available: Sequence[str] | None = None) -> list[str]:
    """The execution providers for `device` (``auto``: CUDA when there, else the CPU)."""
    device = resolve_device(device)
    available = list(ort.get_available_providers() if available is None else available)
    if device != "cpu" and CUDA in available:
        return [CUDA, "CPUExecutionProvider"]
    if device == "cuda":
        raise FailedPrecondition(f"device cuda, but this ONNX Runtime has no CUDA provider (it has "
                                 f"{', '.join(available)}): install cliplora[gpu] on a CUDA host")
    return ["CPUExecutionProvider"]


def create_session(
    path: str | Path,
    *,
    precision: str = "fp32",
    threads: int = 0,
    providers: Sequence[str] | None = None,
    device: str | None = None,
    initializers: Mapping[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """A session for an exported graph; `providers` default to `preferred_providers(device)`.
    `initializers` supply external-data weights from memory instead of the graph's files
    (a staged bank version before its base weights are linked in: `cliplora.export.bank_store`)."""
    _checked()
    options = ort.SessionOptions()
    supplied = [ort.OrtValue.ortvalue_from_numpy(v) for v in (initializers or {}).values()]
    if supplied:
        options.add_external_initializers(list(initializers or {}), supplied)
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if precision == "fp16"
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen = list(providers) if providers is not None else preferred_providers(device)
    with_options = [(name, CUDA_OPTIONS) if name == CUDA else name for name in chosen]
    session = ort.InferenceSession(str(path), options, providers=with_options)
    session.supplied_initializers = supplied  # ONNX Runtime reads them in place: they live as long as the session
    if CUDA in chosen and CUDA not in session.get_providers():
        if resolve_device(device) == "cuda":
            raise FailedPrecondition(f"device cuda, but ONNX Runtime could not start its CUDA provider for {path} "
                                     "(no GPU visible, or CUDA/cuDNN libraries missing); see its warnings above")
        log.warning("the CUDA provider did not start for %s: running on the CPU", path)
    return session


def run_logits(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] uint8 -> [N, C] fp32 logits."""
    return session.run([contract.OUTPUT_NAME], {contract.INPUT_NAME: images})[0]


@dataclass(frozen=True)
class PublishedModel:
    """A published model version opened for inference in this process."""

    repository: ModelRepository
    found: ModelVersion
    session: ort.InferenceSession

    @property
    def image_size(self) -> int:
        return int(self.session.get_inputs()[0].shape[1])

    def labels(self) -> list[str]:
        """The model's labels, checked against the graph's number of classes."""
        labels = self.repository.labels(self.found.name)
        classes = self.session.get_outputs()[0].shape[1]
        if classes != len(labels):
            raise FailedPrecondition(f"{self.found.model_path} has {classes} outputs but labels.txt has {len(labels)} lines")
        return labels


def open_published(
    repository: str | Path, name: str, version: int | None = None, *, threads: int = 0
) -> PublishedModel:
    """The given (or latest) version of a published model, as an ONNX Runtime session."""
    repo = ModelRepository(repository)
    found = repo.get(name, version)
    return PublishedModel(repo, found, create_session(found.model_path, precision=found.precision, threads=threads))


@dataclass(frozen=True)
class PublishedTextEncoder:
    """A classifier's text encoder (``--open-vocabulary``), opened in this process, with
    what scoring request-time labels needs from the classifier's manifest; or a bank's
    (``NAME_text``) for one adapter: `slot` is fed with every text
    (`cliplora.core.bank_runtime.open_bank_text_encoder`)."""

    found: ModelVersion
    session: ort.InferenceSession
    logit_scale: float
    templates: tuple[str, ...]
    tokenizer: ClipTokenizer
    slot: int | None = None  # a bank's text encoder: the adapter's slot

    def embed(self, texts: Sequence[str], batch: int = 64) -> np.ndarray:
        """[N, D] unit embeddings of `texts` as given."""
        tokens = self.tokenizer(list(texts), contract.CONTEXT_LENGTH)
        parts = [self.session.run([contract.TEXT_OUTPUT_NAME], self._feeds(tokens[i : i + batch]))[0]
                 for i in range(0, len(tokens), batch)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    def _feeds(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        if self.slot is None:
            return {contract.TEXT_INPUT_NAME: tokens}
        slots = np.full((len(tokens), 1), self.slot, dtype=contract.BANK_ADAPTER_NUMPY_DTYPE)
        return {contract.TEXT_INPUT_NAME: tokens, contract.BANK_ADAPTER_NAME: slots}

    def label_heads(self, labels: Sequence[str], templates: Sequence[str] | None = None,
                    limits: open_vocab.VocabularyLimits = open_vocab.VocabularyLimits()) -> np.ndarray:
        """[L, D] unit label embeddings (the head), checked and built exactly as the gateway does
        (no two labels the tokenizer reads alike: `open_vocab.check_distinct`); `templates`
        default to the model's own."""
        labels = open_vocab.validate_labels(labels, limits)
        open_vocab.check_distinct(labels, self.tokenizer.encode)
        given = open_vocab.validate_templates(templates, limits) if templates else None
        prompts = open_vocab.request_prompts(labels, given, self.templates, limits.max_prompts)
        return open_vocab.label_embeddings(self.embed(prompts), len(labels))

    def logits(self, image_embeddings: np.ndarray, heads: np.ndarray) -> np.ndarray:
        """[N, L] logits of [N, D] image embeddings against [L, D] label heads."""
        return open_vocab.open_vocabulary_logits(image_embeddings, heads, self.logit_scale)


def run_image_embeddings(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] uint8 -> [N, D] unit image embeddings (``--open-vocabulary`` classifiers)."""
    return session.run([contract.EMBEDS_NAME], {contract.INPUT_NAME: images})[0]


def open_text_encoder(model: PublishedModel, *, threads: int = 0) -> PublishedTextEncoder:
    """The text encoder published with `model`, same version; FailedPrecondition for a
    model exported without ``--open-vocabulary`` (as the gateway answers)."""
    manifest = model.found.manifest()
    name = model.found.name
    if manifest.open_vocabulary is None:
        raise open_vocab.not_open_vocabulary(name)
    found = model.repository.get(manifest.open_vocabulary.text_model, model.found.version)
    tokenizer = get_tokenizer()
    open_vocab.check_vocabulary(name, manifest.open_vocabulary.tokenizer.vocab_sha256, tokenizer.vocab_sha256)
    precision = TextEncoderManifest.read(found.manifest_path).precision  # fp32 beside a cpu-int8 classifier
    session = create_session(found.model_path, precision=precision, threads=threads)
    return PublishedTextEncoder(found, session, manifest.open_vocabulary.logit_scale, tuple(manifest.templates),
                                tokenizer)
