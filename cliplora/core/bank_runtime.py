"""A published adapter bank, opened in this process with ONNX Runtime (`cliplora predict
--adapter`): what Triton and the gateway answer for one adapter, without them.

The bank's graph takes the images and, per image, the adapter's slot, and gives unit image
embeddings; its companion ``NAME_adapters`` (same version) gives the adapter's unit class
embeddings and names. ``logit = logit_scale × cos``, as the gateway computes it
(`cliplora.core.open_vocab.open_vocabulary_logits`). A bank with open vocabulary also has
``NAME_text`` (same version): request-time labels are scored with the adapter's slot of it
and the adapter's templates (`open_bank_text_encoder`), as the gateway scores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cliplora.core import contract, open_vocab
from cliplora.core.bank_manifest import BankAdapterRecord, BankManifest
from cliplora.core.errors import CliploraError, FailedPrecondition, NotFound
from cliplora.core.open_vocab import open_vocabulary_logits
from cliplora.core.repository import ModelRepository
from cliplora.core.runtime import PublishedTextEncoder, create_session
from cliplora.core.tokenizer import get_tokenizer


@dataclass(frozen=True)
class PublishedBank:
    manifest: BankManifest
    session: ort.InferenceSession  # the bank: image + adapter slot -> image_embeds
    table: ort.InferenceSession  # its companion: adapter slot -> class embeddings and names

    @property
    def image_size(self) -> int:
        return self.manifest.settings.image_size

    def adapter(self, adapter_id: str) -> BankAdapterRecord:
        """The adapter's record in this version (empty id: the base); NotFound naming it."""
        record = self.manifest.adapter(adapter_id or contract.BASE_ADAPTER)
        if record is None:
            held = ", ".join(a.adapter for a in self.manifest.adapters)
            raise NotFound(f"adapter {adapter_id!r} not found in bank {self.manifest.name!r} version "
                           f"{self.manifest.version} (adapters: {held})")
        return record

    def classes(self, record: BankAdapterRecord) -> tuple[np.ndarray, list[str]]:
        """The adapter's unit class embeddings [C, D] and names, from the companion."""
        slot = np.array([record.slot], dtype=contract.BANK_ADAPTER_NUMPY_DTYPE)
        embeds, count, names = self.table.run(
            [contract.CLASS_EMBEDS_NAME, contract.CLASS_COUNT_NAME, contract.CLASS_NAMES_NAME],
            {contract.BANK_ADAPTER_NAME: slot})
        n = int(np.asarray(count).reshape(-1)[0])
        return np.asarray(embeds, dtype=np.float32)[:n], [_text(name) for name in np.asarray(names).reshape(-1)[:n]]

    def image_embeddings(self, images: np.ndarray, record: BankAdapterRecord) -> np.ndarray:
        """[N, S, S, 3] uint8 -> [N, D] unit embeddings through the adapter's slot."""
        slots = np.full((len(images), 1), record.slot, dtype=contract.BANK_ADAPTER_NUMPY_DTYPE)
        return self.session.run([contract.EMBEDS_NAME], {contract.INPUT_NAME: images,
                                                         contract.BANK_ADAPTER_NAME: slots})[0]

    def logits(self, image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
        return open_vocabulary_logits(image_embeddings, class_embeddings, self.manifest.settings.logit_scale)


def is_bank(repository: str | Path, name: str) -> bool:
    """True when the latest version of `name` is an adapter bank's."""
    try:
        BankManifest.read(ModelRepository(repository).get(name).manifest_path)
    except CliploraError:
        return False
    return True


def open_bank(repository: str | Path, name: str, version: int | None = None, *, threads: int = 0) -> PublishedBank:
    """The given (or latest) version of bank `name` and of its companion."""
    repo = ModelRepository(repository)
    found = repo.get(name, version)
    manifest = BankManifest.read(found.manifest_path)
    companion = repo.get(contract.adapters_model_name(name), found.version)
    return PublishedBank(manifest,
                         create_session(found.model_path, precision=manifest.settings.precision, threads=threads),
                         create_session(companion.model_path, threads=1, device="cpu"))


def open_bank_text_encoder(repository: str | Path, bank: PublishedBank, record: BankAdapterRecord, *,
                           threads: int = 0) -> PublishedTextEncoder:
    """The bank's text encoder at the bank's version, for `record`'s slot and templates;
    FailedPrecondition for a bank without open vocabulary (as the gateway answers)."""
    manifest = bank.manifest
    recorded = manifest.settings.tokenizer
    if not manifest.settings.open_vocabulary or recorded is None:
        raise FailedPrecondition(f"bank {manifest.name!r} has no text encoder: request-time labels need a bank "
                                 "created with --open-vocabulary")
    tokenizer = get_tokenizer()
    open_vocab.check_vocabulary(manifest.name, recorded.vocab_sha256, tokenizer.vocab_sha256)
    found = ModelRepository(repository).get(contract.text_model_name(manifest.name), manifest.version)
    return PublishedTextEncoder(found, create_session(found.model_path, threads=threads),
                                manifest.settings.logit_scale, tuple(record.templates), tokenizer, slot=record.slot)


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
