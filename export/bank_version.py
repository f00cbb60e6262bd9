"""One bank version in the making: its slots, its staging folder, its publication.

Shared by `bank create` (`cliplora.export.bank_create`) and `bank add`/`remove`
(`cliplora.export.bank_update`). A version is published as the bank's new version and its
companion's (`NAME_adapters`) under one version number, in one step of
`cliplora.export.publish` (the companion first); the version number is fixed before the
files are written (the adapter table names it) and `publish_version` refuses any other.
A version is made in a private temporary folder, never where Triton looks (its polling
reloads a model whose folder changes), and its base weights are hard-linked in by the
publish itself, at the last moment.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import cliplora
from cliplora.core import contract
from cliplora.core.bank_manifest import AdapterTableManifest, BankFilesRecord, BankManifest
from cliplora.core.errors import FailedPrecondition, NotFound
from cliplora.core.hashing import sha256_file
from cliplora.core.manifest import EnvironmentRecord
from cliplora.core.repository import ModelRepository
from cliplora.core.runtime import create_session
from cliplora.export import bank_companion, bank_store, publish
from cliplora.export.bank_config import adapters_config, bank_config
from cliplora.model.graph import EXPORTER, OPSET

LOCK_PURPOSE = "bank"  # the lock a bank command holds from reading the latest version to publishing the next


@dataclass
class Slots:
    """Every slot of a version: the factor stacks [K, ...] by name, each slot's classes, and
    (open vocabulary) the text encoder's factor stacks [K, ...], the same K slots."""

    stacks: dict[str, np.ndarray]
    classes: list[bank_companion.SlotClasses] = field(default_factory=list)
    text_stacks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.classes)

    def append(self, factors: dict[str, np.ndarray], classes: bank_companion.SlotClasses) -> int:
        """A new slot (the next number, never one given out before); returns it. `factors`:
        one slot of every stack, the bank's and its text encoder's."""
        if set(factors) != set(self.stacks) | set(self.text_stacks):
            raise ValueError("an adapter's factors must cover every stack of the bank (and of its text encoder)")
        for name, values in factors.items():
            stacks = self.stacks if name in self.stacks else self.text_stacks
            stacks[name] = np.concatenate([stacks[name], values[None].astype(np.float32)])
        self.classes.append(classes)
        return self.count - 1

    def clear(self, slot: int) -> None:
        """All zeros and no classes: a retired slot answers as the base and is never reused."""
        for values in (*self.stacks.values(), *self.text_stacks.values()):
            values[slot] = 0.0
        self.classes[slot] = bank_companion.SlotClasses([], self.classes[slot].embeddings[:0])


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def environment() -> EnvironmentRecord:
    return EnvironmentRecord(python=platform.python_version(), torch=torch.__version__)


def latest(root: Path, name: str) -> tuple[Path, BankManifest]:
    """The folder and manifest of the bank's latest version; NotFound / FailedPrecondition otherwise."""
    repository = ModelRepository(root)
    if not repository.versions(name):
        raise NotFound(f"no bank {name!r} in {root} (create it with `cliplora bank create`)")
    found = repository.get(name)
    try:
        manifest = BankManifest.read(found.manifest_path)
    except FailedPrecondition as exc:
        raise FailedPrecondition(f"{name!r} in {root} is not an adapter bank ({exc})") from None
    if manifest.version != found.version:
        raise FailedPrecondition(f"{found.manifest_path} says version {manifest.version}: the bank is damaged")
    return found.path, manifest


def load_slots(root: Path, name: str, folder: Path, manifest: BankManifest) -> Slots:
    """The slots of a published version (its factors files, its text encoder's too, and its companion's classes)."""
    companion = root / contract.adapters_model_name(name) / str(manifest.version)
    if not companion.is_dir():
        raise FailedPrecondition(f"{companion} is missing: the bank's adapter table for version "
                                 f"{manifest.version} is gone; nothing published")
    text = root / contract.text_model_name(name) / str(manifest.version)
    if manifest.settings.open_vocabulary and not text.is_dir():
        raise FailedPrecondition(f"{text} is missing: the bank's text encoder for version {manifest.version} is "
                                 "gone; nothing published")
    slots = Slots(bank_store.read_stacks(folder), bank_companion.read_slots(companion),
                  bank_store.read_stacks(text) if manifest.settings.open_vocabulary else {})
    stacks = (*slots.stacks.values(), *slots.text_stacks.values())
    if any(len(v) != slots.count for v in stacks) or slots.count != manifest.files.slots:
        raise FailedPrecondition(f"bank {name!r} version {manifest.version}: its files disagree on the number of "
                                 f"slots (manifest {manifest.files.slots}); nothing published")
    return slots


def engine_key(base_sha256: str, factors_sha256: str) -> str:
    """`--target gpu`: what makes each version's TensorRT engine its own (`bank_store.KEY_SEPARATOR`)."""
    return hashlib.sha256(f"{base_sha256}:{factors_sha256}".encode()).hexdigest()[:16]


def files_record(folder: Path, base: bank_store.StoredFile, factors: bank_store.StoredFile, slots: int,
                 key: str | None, fp32_base_sha256: str | None) -> BankFilesRecord:
    return BankFilesRecord(model_sha256=sha256_file(folder / contract.MODEL_FILENAME),
                           base_weights_sha256=base.sha256, base_weights_bytes=base.bytes,
                           factors_sha256=factors.sha256, factors_bytes=factors.bytes, slots=slots, opset=OPSET,
                           exporter=EXPORTER, onnxruntime_version=onnxruntime.__version__, tensorrt_engine_key=key,
                           fp32_base_weights_sha256=fp32_base_sha256)


def sessions(folder: Path, base_folder: Path, int8: bool) \
        -> tuple[onnxruntime.InferenceSession, onnxruntime.InferenceSession | None]:
    """(the fp32 bank, the INT8 bank for cpu-int8) of a staged version, the base weights read
    from `base_folder`'s files (the staged version does not link them before it is published)."""
    def session(files: bank_store.GraphFiles, precision: str) -> onnxruntime.InferenceSession:
        return create_session(folder / files.graph, precision=precision, providers=["CPUExecutionProvider"],
                              initializers=bank_store.base_initializers(folder, files, base_folder))

    if not int8:
        return session(bank_store.BANK_FILES, "fp32"), None
    return session(bank_store.FP32_FILES, "fp32"), session(bank_store.BANK_FILES, "int8")


def publish_bank(root: Path, manifest: BankManifest, slots: Slots, staged: Path,
                 links: Mapping[str, Path] | None = None, companions: Sequence[publish.StagedModel] = ()) -> int:
    """Write the manifests and the companion next to the staged bank version (`staged/version`),
    then publish both under `manifest.version`; `links` (file name -> the previous version's
    file) are the base weights, hard-linked into the version as it goes in. `companions`:
    the bank's text encoder (`cliplora.export.bank_text.companions`), published first."""
    name, settings = manifest.name, manifest.settings
    version_folder, table_folder = staged / "version", staged / "adapters"
    table_folder.mkdir()
    table = [a.row() for a in manifest.adapters]
    companion = bank_companion.write(bank_companion.build(slots.classes, table, settings.embedding_dim), table_folder)
    companion_name = contract.adapters_model_name(name)
    companion_manifest = AdapterTableManifest(
        cliplora_version=cliplora.__version__, name=companion_name, bank=name, version=manifest.version,
        created=manifest.created, adapters=len(table), slots=slots.count,
        max_classes=max((len(s.names) for s in slots.classes), default=0), embedding_dim=settings.embedding_dim,
        model_sha256=sha256_file(companion))
    (table_folder / contract.MANIFEST_FILENAME).write_text(companion_manifest.to_json(), encoding="utf-8")
    (version_folder / contract.MANIFEST_FILENAME).write_text(manifest.to_json(), encoding="utf-8")
    return publish.publish_version(
        root, name, version_folder, config=bank_config(name, settings), labels=None, record=BankManifest,
        version=manifest.version, links=links,
        companions=[*companions, publish.StagedModel(companion_name, table_folder,
                                                     adapters_config(name, settings.embedding_dim),
                                                     record=AdapterTableManifest)])
