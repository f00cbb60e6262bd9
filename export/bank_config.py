"""``config.pbtxt`` of an adapter bank and of its companion, as tritonclient's `ModelConfig`.

Both are written once, by `bank create`, and never change: Triton reloads a model whose
config changed, while a new version folder only loads beside the one serving. Every
`bank add`/`remove` rebuilds them from the bank's manifest and `export.publish` checks
them equal to the files (a mismatch refuses the version).

- The bank: ``image`` UINT8 [S, S, 3] and ``adapter`` INT32 [1] -> ``image_embeds`` FP32
  [D], dynamic batching (requests for different adapters share a batch), one instance of
  no fixed kind (``KIND_CPU`` for cpu-int8), and the parameters the gateway reads
  (`cliplora.core.contract.bank_shape`). ``--target gpu`` adds the TensorRT FP16 blocks of
  `export --target gpu` for both inputs (`cliplora.export.model_config`); not run on a GPU.
- The companion: ``adapter`` INT32 [1] without a batch dimension (``max_batch_size: 0``,
  no dynamic batching: one slot per request) -> ``class_embeds`` FP32 [-1, D],
  ``class_count`` INT32 [1], ``class_names`` and ``adapters`` TYPE_STRING (BYTES on the
  wire); the class dimension is -1 because each version has its own largest class count.
  Always on the CPU: it is a lookup table, and strings have no GPU kernels.
- The text encoder ``NAME_text`` of a bank with open vocabulary (`bank_text_config`):
  ``tokens`` INT32 [77] and ``adapter`` INT32 [1] -> ``text_embeds`` FP32 [D], dynamic
  batching, the bank's max batch size, instances and TensorRT blocks (for both inputs),
  always fp32; ``classifier`` names the bank. The bank's config then names it
  (``text_model``) and the tokenizer's vocabulary (``tokenizer_vocab_sha256``).
- Versions loaded: `BANK_VERSIONS_LOADED` (the text encoder's too), `TABLE_VERSIONS_LOADED`.
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from cliplora.core import contract
from cliplora.core.bank_manifest import BankSettingsRecord
from cliplora.export.model_config import MAX_QUEUE_DELAY_US, _gpu_blocks

# Triton loads the latest version of a bank only: ONNX Runtime copies the base weights into
# each session (measured: +350 MB per loaded ViT-B/16 version, hard links or not), and Triton
# unloads the previous version once its in-flight requests are done. The companion keeps
# the two latest: a bank version that fails to load leaves the previous one serving, and
# the gateway still finds that version's table (the companion's new version loads anyway).
BANK_VERSIONS_LOADED = 1
TABLE_VERSIONS_LOADED = 2
# NAME_text keeps two as well: it is published first, so during an add its new version is
# ready while the bank still serves the old one; with the old text version still loaded,
# labelled requests keep a version all three have (with one, they waited for the bank's
# load and were UNAVAILABLE past `serve/gateway/triton.py`'s LOADS_WAIT_S). The price: a
# second text tower session (the ViT-B/16 text weights are 254 MB in fp32).
TEXT_VERSIONS_LOADED = 2


def _dtype(name: str) -> int:
    return mc.DataType.Value(name)


def bank_config(name: str, settings: BankSettingsRecord) -> mc.ModelConfig:
    """The bank's configuration."""
    image_shape = (settings.image_size, settings.image_size, contract.CHANNELS)
    config = mc.ModelConfig(name=name, platform=contract.PLATFORM, max_batch_size=settings.max_batch_size)
    config.input.add(name=contract.INPUT_NAME, data_type=_dtype(contract.INPUT_TRITON_DTYPE), dims=list(image_shape))
    config.input.add(name=contract.BANK_ADAPTER_NAME, data_type=_dtype(contract.BANK_ADAPTER_TRITON_DTYPE), dims=[1])
    config.output.add(name=contract.BANK_OUTPUT_NAME, data_type=_dtype(contract.OUTPUT_TRITON_DTYPE),
                      dims=[settings.embedding_dim])
    kind = mc.ModelInstanceGroup.KIND_CPU if settings.target == "cpu-int8" else mc.ModelInstanceGroup.KIND_AUTO
    config.instance_group.add(count=1, kind=kind)
    config.dynamic_batching.max_queue_delay_microseconds = MAX_QUEUE_DELAY_US
    config.version_policy.latest.num_versions = BANK_VERSIONS_LOADED
    parameters = {
        contract.PARAM_KIND: contract.KIND_BANK,
        contract.PARAM_PRECISION: settings.precision,
        contract.PARAM_ADAPTERS_MODEL: contract.adapters_model_name(name),
        contract.PARAM_LOGIT_SCALE: repr(float(settings.logit_scale)),
        contract.PARAM_MAX_RANK: str(settings.max_rank),
        contract.PARAM_MATRICES: ",".join(settings.matrices),
        **_open_vocabulary(name, settings),
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    if settings.target == "gpu":
        _gpu_blocks(config, name, [(contract.INPUT_NAME, image_shape, contract.INPUT_TRITON_DTYPE),
                                   (contract.BANK_ADAPTER_NAME, (1,), contract.BANK_ADAPTER_TRITON_DTYPE)],
                    settings.max_batch_size)
    return config


def _open_vocabulary(name: str, settings: BankSettingsRecord) -> dict[str, str]:
    """What the bank's config says about its text side (nothing without open vocabulary)."""
    if not settings.open_vocabulary:
        return {}
    if settings.tokenizer is None:
        raise ValueError(f"bank {name} has open vocabulary but records no tokenizer")
    return {contract.PARAM_TEXT_MODEL: contract.text_model_name(name),
            contract.PARAM_VOCAB_SHA256: settings.tokenizer.vocab_sha256}


def bank_text_config(bank: str, settings: BankSettingsRecord) -> mc.ModelConfig:
    """The configuration of the bank's text encoder (`cliplora.core.contract.text_model_name`)."""
    if not settings.open_vocabulary:
        raise ValueError(f"bank {bank} has no open vocabulary, hence no text encoder")
    name = contract.text_model_name(bank)
    config = mc.ModelConfig(name=name, platform=contract.PLATFORM, max_batch_size=settings.max_batch_size)
    config.input.add(name=contract.TEXT_INPUT_NAME, data_type=_dtype(contract.TEXT_INPUT_TRITON_DTYPE),
                     dims=[contract.CONTEXT_LENGTH])
    config.input.add(name=contract.BANK_ADAPTER_NAME, data_type=_dtype(contract.BANK_ADAPTER_TRITON_DTYPE), dims=[1])
    config.output.add(name=contract.TEXT_OUTPUT_NAME, data_type=_dtype(contract.OUTPUT_TRITON_DTYPE),
                      dims=[settings.embedding_dim])
    kind = mc.ModelInstanceGroup.KIND_CPU if settings.target == "cpu-int8" else mc.ModelInstanceGroup.KIND_AUTO
    config.instance_group.add(count=1, kind=kind)
    config.dynamic_batching.max_queue_delay_microseconds = MAX_QUEUE_DELAY_US
    config.version_policy.latest.num_versions = TEXT_VERSIONS_LOADED
    parameters = _open_vocabulary(bank, settings)
    config.parameters[contract.PARAM_CLASSIFIER].string_value = bank
    config.parameters[contract.PARAM_PRECISION].string_value = "fp32"
    config.parameters[contract.PARAM_VOCAB_SHA256].string_value = parameters[contract.PARAM_VOCAB_SHA256]
    if settings.target == "gpu":
        _gpu_blocks(config, name, [(contract.TEXT_INPUT_NAME, (contract.CONTEXT_LENGTH,),
                                    contract.TEXT_INPUT_TRITON_DTYPE),
                                   (contract.BANK_ADAPTER_NAME, (1,), contract.BANK_ADAPTER_TRITON_DTYPE)],
                    settings.max_batch_size)
    return config


def adapters_config(bank: str, embedding_dim: int) -> mc.ModelConfig:
    """The companion's configuration (`cliplora.core.contract.adapters_model_name`)."""
    config = mc.ModelConfig(name=contract.adapters_model_name(bank), platform=contract.PLATFORM, max_batch_size=0)
    config.input.add(name=contract.BANK_ADAPTER_NAME, data_type=_dtype(contract.BANK_ADAPTER_TRITON_DTYPE), dims=[1])
    config.output.add(name=contract.CLASS_EMBEDS_NAME, data_type=_dtype(contract.OUTPUT_TRITON_DTYPE),
                      dims=[-1, embedding_dim])
    config.output.add(name=contract.CLASS_COUNT_NAME, data_type=_dtype(contract.BANK_ADAPTER_TRITON_DTYPE), dims=[1])
    config.output.add(name=contract.CLASS_NAMES_NAME, data_type=_dtype(contract.STRING_TRITON_DTYPE), dims=[-1])
    config.output.add(name=contract.ADAPTER_TABLE_NAME, data_type=_dtype(contract.STRING_TRITON_DTYPE), dims=[1])
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    config.version_policy.latest.num_versions = TABLE_VERSIONS_LOADED
    config.parameters[contract.PARAM_BANK].string_value = bank
    config.parameters[contract.PARAM_PRECISION].string_value = "fp32"
    return config
