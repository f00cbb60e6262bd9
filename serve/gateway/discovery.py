"""What Triton serves, as the gateway's model entries (`cliplora.serve.gateway.models`).

From the ready versions of Triton's repository index and each model's config:

- text encoders (``<name>_text``) become the open-vocabulary side of the classifier that
  names them (and that they name back);
- a classifier's class names come from its labels.txt, through Triton's classification
  extension (one call per model version, remembered);
- an adapter bank's adapter tables come from its companion ``<name>_adapters`` (one call
  per version both have ready, remembered: a version's table never changes); companions
  and text encoders are not models of their own to a caller.

A model that does not follow the contract is skipped with a warning naming why; the
others are still served.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from tritonclient.grpc.aio import InferResult
from tritonclient.utils import InferenceServerException

from cliplora.core import contract
from cliplora.core.errors import CliploraError
from cliplora.serve.gateway.models import (
    BankSide,
    ModelEntry,
    TextEntry,
    describe_open_vocabulary,
    ready_text_encoder,
)

log = logging.getLogger(__name__)
DISCOVERY_TIMEOUT_S = 60.0  # a first call may wait for a cold ONNX Runtime session

Tensor = tuple[str, np.ndarray, str]  # (input name, values, KServe wire datatype)
# (model, version, inputs, outputs, timeout_s, class_count) -> Triton's answer
Call = Callable[[str, int, Sequence[Tensor], Sequence[str], float, int], Awaitable[InferResult]]


class Discovery:
    """Turns the index and configs into entries; remembers what never changes per version."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._class_names: dict[tuple[str, int], tuple[str, ...]] = {}
        self._tables: dict[tuple[str, int], dict[str, contract.AdapterRow]] = {}

    async def describe(self, ready: dict[str, list[int]], configs: dict[str, dict[str, Any]]) -> dict[str, ModelEntry]:
        for kept in (self._class_names, self._tables):  # versions no longer ready are forgotten
            for name, version in [key for key in kept if version_gone(key, ready)]:
                del kept[(name, version)]
        texts = _text_entries(ready, configs)
        companions = {name for name, config in configs.items() if contract.parameter(config, contract.PARAM_BANK)}
        found: dict[str, ModelEntry] = {}
        for name, config in configs.items():
            if name in texts or name in companions:
                continue
            try:
                if contract.is_bank(config):
                    found[name] = await self._bank(name, ready, configs, config, texts)
                else:
                    found[name] = await self._classifier(name, sorted(ready[name]), config, texts)
            except (InferenceServerException, CliploraError, ValueError) as exc:
                log.warning("skipping model %s: %s", name, exc)
        return _with_promotions(found)

    async def _classifier(self, name: str, versions: list[int], config: dict[str, Any],
                          texts: dict[str, TextEntry]) -> ModelEntry:
        shape = contract.classifier_shape(name, config)
        names = await self._class_names_of(name, versions[-1], shape.image_size, shape.num_classes)
        return ModelEntry(name, tuple(versions), shape.image_size, shape.num_classes, shape.max_batch_size, names,
                          describe_open_vocabulary(name, config, shape, texts),
                          contract.parameter(config, contract.PARAM_TEXT_MODEL) or None,
                          promotion=contract.promotion(config))

    async def _class_names_of(self, name: str, version: int, size: int, classes: int) -> tuple[str, ...]:
        """Class names via Triton's classification extension (``"value:index:label"`` strings
        from the model's labels.txt)."""
        key = (name, version)
        if key not in self._class_names:
            image = np.zeros((1, size, size, contract.CHANNELS), dtype=np.uint8)
            result = await self._call(name, version, [(contract.INPUT_NAME, image, contract.INPUT_WIRE_DTYPE)],
                                      [contract.OUTPUT_NAME], DISCOVERY_TIMEOUT_S, classes)
            names: list[str | None] = [None] * classes
            for entry in result.as_numpy(contract.OUTPUT_NAME).reshape(-1):
                text = entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)
                _value, index, label = text.split(":", 2)
                names[int(index)] = label
            if any(n is None for n in names):
                raise ValueError(f"model {name} has no labels.txt (classification extension gave no labels)")
            self._class_names[key] = tuple(names)  # type: ignore[arg-type]
        return self._class_names[key]

    async def _bank(self, name: str, ready: dict[str, list[int]], configs: dict[str, dict[str, Any]],
                    config: dict[str, Any], texts: dict[str, TextEntry]) -> ModelEntry:
        """A bank and the tables of the versions its companion has ready too (the two load
        one after the other: a version without its table is not routed to yet), and its
        text encoder when it has one and it is ready (`_bank_text`)."""
        shape = contract.bank_shape(name, config)
        companion = configs.get(shape.adapters_model)
        if companion is None:
            raise ValueError(f"its adapter table {shape.adapters_model} is not ready in Triton")
        if contract.adapters_model_shape(shape.adapters_model, companion) != shape.embedding_dim:
            raise ValueError(f"its adapter table {shape.adapters_model} has another embedding size")
        versions = sorted(ready[name])
        tables = {version: await self._table(shape.adapters_model, version)
                  for version in versions if version in ready[shape.adapters_model]}
        base = tables[max(tables)][contract.BASE_ADAPTER].num_classes if tables else 0
        text_model = contract.parameter(config, contract.PARAM_TEXT_MODEL) or None
        return ModelEntry(name, tuple(versions), shape.image_size, base, shape.max_batch_size, (),
                          bank=BankSide(shape.adapters_model, shape.logit_scale, shape.embedding_dim, tables,
                                        text=_bank_text(name, text_model, shape.embedding_dim, texts),
                                        text_model=text_model,
                                        vocab_sha256=contract.parameter(config, contract.PARAM_VOCAB_SHA256) or ""))

    async def _table(self, companion: str, version: int) -> dict[str, contract.AdapterRow]:
        key = (companion, version)
        if key not in self._tables:
            slot = np.array([contract.BASE_SLOT], dtype=contract.BANK_ADAPTER_NUMPY_DTYPE)
            result = await self._call(companion, version,
                                      [(contract.BANK_ADAPTER_NAME, slot, contract.BANK_ADAPTER_WIRE_DTYPE)],
                                      [contract.ADAPTER_TABLE_NAME], DISCOVERY_TIMEOUT_S, 0)
            (raw,) = result.as_numpy(contract.ADAPTER_TABLE_NAME).reshape(-1)
            self._tables[key] = {row.adapter: row for row in contract.read_adapter_table(raw)}
        return self._tables[key]


def _with_promotions(found: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
    """Each bank with the promoted classifiers that serve its adapters now: named by it, and
    promoted from the content its newest table holds for the adapter (a promotion of an
    adapter since replaced is left out, with a warning)."""
    for name, entry in list(found.items()):
        if entry.bank is None or not entry.bank.tables:
            continue
        table = entry.bank.latest_table()
        promotions = {}
        for promoted in found.values():
            claim = promoted.promotion
            if claim is None or claim.bank != name:
                continue
            if promoted.name != contract.promoted_model_name(name, claim.adapter):
                log.warning("%s claims to serve adapter %s of bank %s under another name than %s: not routed to",
                            promoted.name, claim.adapter, name, contract.promoted_model_name(name, claim.adapter))
                continue
            row = table.get(claim.adapter)
            if row is None or row.lora_sha256 != claim.lora_sha256:
                log.warning("%s was promoted from adapter %s of bank %s, which the bank no longer holds as it was: "
                            "requests for the adapter go to the bank", promoted.name, claim.adapter, name)
                continue
            promotions[claim.adapter] = promoted
        found[name] = replace(entry, bank=replace(entry.bank, promotions=promotions))
    return found


def version_gone(key: tuple[str, int], ready: dict[str, list[int]]) -> bool:
    name, version = key
    return version not in ready.get(name, ())


def _bank_text(bank: str, text_model: str | None, embedding_dim: int, texts: dict[str, TextEntry]) -> TextEntry | None:
    """The bank's text encoder, when the bank's config names one that is ready, takes the
    adapter per sample and names the bank back; None (with the reason logged) otherwise."""
    if not text_model:
        return None
    return ready_text_encoder(f"bank {bank}", bank, text_model, embedding_dim, texts, per_adapter=True)


def _text_entries(ready: dict[str, list[int]], configs: dict[str, dict[str, Any]]) -> dict[str, TextEntry]:
    texts: dict[str, TextEntry] = {}
    for name, config in configs.items():
        if not contract.is_text_model(config):
            continue
        try:
            shape = contract.text_shape(name, config)
        except ValueError as exc:
            log.warning("skipping text encoder %s: %s", name, exc)
            continue
        texts[name] = TextEntry(name, tuple(sorted(ready[name])), shape.embedding_dim, shape.max_batch_size,
                                contract.parameter(config, contract.PARAM_CLASSIFIER) or "",
                                per_adapter=contract.is_bank_text_model(config))
    return texts
