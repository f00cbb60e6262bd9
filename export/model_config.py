"""A model's Triton ``config.pbtxt``, built as tritonclient's `ModelConfig` protobuf.

The message is what Triton itself parses, so a field that does not exist cannot be
written, and two configs are compared as messages, not as strings (`same_config`).

One instance and no instance kind (KIND_AUTO): one instance per GPU where there are
GPUs, one on the CPU otherwise, so one repository serves both. One CPU instance using
every core, fed batches by the dynamic batcher, beat two single-threaded instances
here (two instances let the batcher hand a batch of two to one instance while the other
idles: docs/benchmarks.md). fp16 models ask Triton's ONNX Runtime backend for its
TensorRT accelerator in FP16 on GPUs (ignored on CPUs). ``target="gpu"`` adds what a
production GPU server wants (`_gpu_blocks`); the instance kind stays portable, so the
same file still loads on a CPU-only Triton. ``target="cpu-int8"`` pins the instance to the
CPU (``KIND_CPU``): its INT8 graph is made for ONNX Runtime's CPU kernels, and the
official image's native backend honours the kind.

ONNX Runtime threads are model parameters (`RuntimeParameters`), written only when the
export is told them: ``intra_op_thread_count`` and ``inter_op_thread_count`` are read by
Triton's native ONNX Runtime backend and by ours; ``allow_spinning`` only by ours (the
native backend has no such switch, and ignores parameters it does not know). Unset, our
backend does not spin (measured to cost the local stack 21-35% of its throughput on 2
cores: docs/benchmarks.md) and shares the cores between instances; ``auto`` spins only
for a model alone in its repository, ``on`` always (a dedicated CPU server).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from google.protobuf import json_format, text_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from cliplora.core import contract

TARGETS = ("portable", "gpu", "cpu-int8")
SPINNING = ("auto", "on", "off")
TRT_CACHE_ROOT = "/cache/tensorrt"  # the deployment mounts a writable volume here (deploy/)
TRT_WORKSPACE_BYTES = 2 * 1024**3
TRT_OPT_BATCH = 8  # the TensorRT profile's tuning point: a typical dynamic batch under load
MAX_QUEUE_DELAY_US = 2000
ModelConfig = mc.ModelConfig


@dataclass(frozen=True)
class RuntimeParameters:
    """ONNX Runtime settings for the model's instances; None: the backend's default."""

    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    spinning: str | None = None  # auto | on | off

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1024:
                raise ValueError(f"{name} must be 0 (ONNX Runtime's choice) to 1024, got {value}")
        if self.spinning is not None and self.spinning not in SPINNING:
            raise ValueError(f"spinning must be one of {', '.join(SPINNING)}, got {self.spinning!r}")

    def apply(self, config: mc.ModelConfig) -> None:
        if self.intra_op_threads is not None:
            config.parameters[contract.PARAM_INTRA_OP_THREADS].string_value = str(self.intra_op_threads)
        if self.inter_op_threads is not None:
            config.parameters[contract.PARAM_INTER_OP_THREADS].string_value = str(self.inter_op_threads)
        if self.spinning is not None:
            config.parameters[contract.PARAM_SPINNING].string_value = self.spinning


@dataclass(frozen=True)
class OpenVocabularyParameters:
    """What the gateway needs to score request-time labels, carried by the classifier's
    config (the gateway may not see the repository, but it always sees Triton's configs)."""

    text_model: str
    logit_scale: float
    templates: tuple[str, ...]
    vocab_sha256: str


def model_config(
    name: str,
    spec: contract.TensorSpec,
    precision: str,
    max_batch_size: int,
    target: str = "portable",
    open_vocabulary: OpenVocabularyParameters | None = None,
    runtime: RuntimeParameters = RuntimeParameters(),
    promotion: contract.Promotion | None = None,
) -> mc.ModelConfig:
    """The classifier's configuration, as the message Triton reads. With `open_vocabulary`
    (and `spec.embedding_dim`), it also declares the ``image_embeds`` output; with
    `promotion` (`cliplora bank promote`), it names the bank adapter it serves."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    if (open_vocabulary is None) != (spec.embedding_dim is None):
        raise ValueError("open-vocabulary parameters go with an embedding size, and only with one")
    config = mc.ModelConfig(name=name, platform=contract.PLATFORM, max_batch_size=max_batch_size)
    config.input.add(name=contract.INPUT_NAME, data_type=mc.DataType.Value(contract.INPUT_TRITON_DTYPE),
                     dims=list(spec.input_shape))
    config.output.add(name=contract.OUTPUT_NAME, data_type=mc.DataType.Value(contract.OUTPUT_TRITON_DTYPE),
                      dims=list(spec.output_shape), label_filename=contract.LABELS_FILENAME)
    if spec.embedding_dim is not None:
        config.output.add(name=contract.EMBEDS_NAME, data_type=mc.DataType.Value(contract.OUTPUT_TRITON_DTYPE),
                          dims=[spec.embedding_dim])
    _instances(config, target)
    config.dynamic_batching.max_queue_delay_microseconds = MAX_QUEUE_DELAY_US
    config.parameters[contract.PARAM_PRECISION].string_value = precision
    runtime.apply(config)
    if open_vocabulary is not None:
        config.parameters[contract.PARAM_TEXT_MODEL].string_value = open_vocabulary.text_model
        config.parameters[contract.PARAM_LOGIT_SCALE].string_value = repr(float(open_vocabulary.logit_scale))
        config.parameters[contract.PARAM_TEMPLATES].string_value = json.dumps(list(open_vocabulary.templates))
        config.parameters[contract.PARAM_VOCAB_SHA256].string_value = open_vocabulary.vocab_sha256
    if promotion is not None:
        config.parameters[contract.PARAM_PROMOTED_FROM].string_value = promotion.bank
        config.parameters[contract.PARAM_PROMOTED_ADAPTER].string_value = promotion.adapter
        config.parameters[contract.PARAM_PROMOTED_LORA_SHA256].string_value = promotion.lora_sha256
    if target == "gpu":
        _gpu_blocks(config, name, [(contract.INPUT_NAME, spec.input_shape, contract.INPUT_TRITON_DTYPE)],
                    max_batch_size)
    elif precision == "fp16":
        _tensorrt_fp16(config, {})
    return config


def text_model_config(
    name: str,
    classifier: str,
    embedding_dim: int,
    precision: str,
    max_batch_size: int,
    target: str = "portable",
    *,
    vocab_sha256: str,
    runtime: RuntimeParameters = RuntimeParameters(),
) -> mc.ModelConfig:
    """The text encoder's configuration: ``tokens`` INT32 [77] -> ``text_embeds`` FP32 [D]."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    config = mc.ModelConfig(name=name, platform=contract.PLATFORM, max_batch_size=max_batch_size)
    config.input.add(name=contract.TEXT_INPUT_NAME, data_type=mc.DataType.Value(contract.TEXT_INPUT_TRITON_DTYPE),
                     dims=[contract.CONTEXT_LENGTH])
    config.output.add(name=contract.TEXT_OUTPUT_NAME, data_type=mc.DataType.Value(contract.OUTPUT_TRITON_DTYPE),
                      dims=[embedding_dim])
    _instances(config, target)
    config.dynamic_batching.max_queue_delay_microseconds = MAX_QUEUE_DELAY_US
    config.parameters[contract.PARAM_PRECISION].string_value = precision
    runtime.apply(config)
    config.parameters[contract.PARAM_CLASSIFIER].string_value = classifier
    config.parameters[contract.PARAM_VOCAB_SHA256].string_value = vocab_sha256
    if target == "gpu":
        _gpu_blocks(config, name, [(contract.TEXT_INPUT_NAME, (contract.CONTEXT_LENGTH,),
                                    contract.TEXT_INPUT_TRITON_DTYPE)], max_batch_size)
    elif precision == "fp16":
        _tensorrt_fp16(config, {})
    return config


def _instances(config: mc.ModelConfig, target: str) -> None:
    """One instance; of no fixed kind (KIND_AUTO), except on the CPU for ``cpu-int8``."""
    if target == "cpu-int8":
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    else:
        config.instance_group.add(count=1)


def render_config(
    name: str, spec: contract.TensorSpec, precision: str, max_batch_size: int, target: str = "portable"
) -> str:
    """The text of a classifier's ``config.pbtxt`` (protobuf text format, as Triton parses it)."""
    return to_text(model_config(name, spec, precision, max_batch_size, target))


def to_text(config: Message) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    """A ``config.pbtxt`` as a message; `text_format.ParseError` when it is not one."""
    return text_format.Parse(text, mc.ModelConfig())


def promotion_of(config: mc.ModelConfig) -> contract.Promotion | None:
    """The bank adapter a classifier's config says it serves (`contract.promotion`), or None."""
    return contract.promotion(json_format.MessageToDict(config, preserving_proto_field_name=True))


def same_config(text: str, config: mc.ModelConfig) -> bool:
    """True when `text` parses to exactly `config` (formatting and field order aside)."""
    try:
        return parse_config(text) == config
    except text_format.ParseError:
        return False


def _tensorrt_fp16(config: mc.ModelConfig, extra: dict[str, str]) -> None:
    """Triton's ONNX Runtime backend: the TensorRT execution accelerator in FP16.

    Parameter names are the backend's (``precision_mode``, ``max_workspace_size_bytes``,
    then ONNX Runtime's ``trt_*`` provider options, which the backend passes on). The
    backend refuses unknown names, so nothing else goes here. CPU instances ignore it.
    """
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    accelerator.parameters.update(
        {"precision_mode": "FP16", "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES), **extra})


def _gpu_blocks(config: mc.ModelConfig, name: str, inputs: list[tuple[str, tuple[int, ...], str]],
                max_batch_size: int) -> None:
    """TensorRT FP16 with an engine cache and one optimisation profile, and warm-up.

    - **One profile for every batch size** (``trt_profile_*``, 1 .. max_batch_size, tuned
      for ``TRT_OPT_BATCH``; each of `inputs` is a name, a shape per item and a Triton
      dtype): without it ONNX Runtime builds an engine for the first batch size it sees
      and rebuilds (seconds to minutes, requests waiting) each time a larger batch
      arrives. ONNX Runtime needs the three options together when the cache is on.
    - **Engine cache** in ``<TRT_CACHE_ROOT>/<name>`` (ONNX Runtime creates that last
      folder; the deployment mounts TRT_CACHE_ROOT): a restart loads the engine instead of
      rebuilding it. The cache key does not cover weights, hence one folder per model and
      `cliplora.export.engine_key` for versions. The timing cache (kernel timings only,
      safe to share) lives in TRT_CACHE_ROOT itself and speeds up builds of every model.
    - **Warm-up** with zero inputs (all of them) at batch 1 and at max_batch_size: the
      engine is built or loaded, and the largest buffers allocated, before Triton reports
      the model ready, so the first real request does not pay for it.
    """
    def profile(batch: int) -> str:
        return ",".join(f"{input_name}:{batch}x{'x'.join(str(d) for d in shape)}" for input_name, shape, _ in inputs)

    _tensorrt_fp16(config, {
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"{TRT_CACHE_ROOT}/{name}",
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": TRT_CACHE_ROOT,
        "trt_profile_min_shapes": profile(1),
        "trt_profile_opt_shapes": profile(min(TRT_OPT_BATCH, max_batch_size)),
        "trt_profile_max_shapes": profile(max_batch_size),
    })
    for batch in sorted({1, max_batch_size}):
        warmup = config.model_warmup.add(name=f"zeros-batch-{batch}", batch_size=batch)
        for input_name, shape, dtype in inputs:
            sample = warmup.inputs[input_name]
            sample.data_type = mc.DataType.Value(dtype)
            sample.dims.extend(shape)
            sample.zero_data = True
