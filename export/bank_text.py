"""The text encoder ``NAME_text`` of a bank with open vocabulary: its versions, made beside the bank's.

``bank create --open-vocabulary`` exports `cliplora.model.bank_text_graph.BankTextGraph`
once (the only text export of the bank's life) and lays its version out as the bank's
(`cliplora.export.bank_store`): ``model.onnx``, ``base_weights.bin`` (the text tower, the
same file in every version), ``adapter_factors.bin`` (every slot's text factors). Every
`bank add` / `bank remove` writes the next version from the previous one without torch
(longer or zeroed stacks), and its base weights are hard-linked in by the publish step
itself, at the last moment, as the bank's (a link made earlier would reload the serving
version: docs/architecture.md, "Adapter banks"). Until then the staged graph reads them
from the previous version's file in memory (`session`).

``NAME_text`` is published in the same step as the bank and its companion, under the same
version number; its config is written once, at create (`bank_config.bank_text_config`).
It stays fp32 in a ``cpu-int8`` bank, as an export's text encoder does beside an INT8
classifier. Its checks: `cliplora.export.bank_text_verify`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime

import cliplora
from cliplora.core import contract
from cliplora.core.bank_manifest import (
    AdapterVerificationRecord,
    BankFilesRecord,
    BankManifest,
    BankSettingsRecord,
    BankTextFilesRecord,
    BankTextManifest,
    BaseVerificationRecord,
)
from cliplora.core.errors import FailedPrecondition
from cliplora.core.hashing import sha256_file
from cliplora.core.progress import Progress
from cliplora.core.runtime import create_session
from cliplora.core.tokenizer import ClipTokenizer, get_tokenizer
from cliplora.export import bank_store, bank_text_verify, bank_verify, publish
from cliplora.export.bank_config import bank_text_config
from cliplora.export.bank_text_verify import TextCase
from cliplora.export.bank_version import Slots, engine_key
from cliplora.model.bank_text_graph import BankTextGraph, export_bank_text
from cliplora.model.base_model import BaseModel

STAGED_FOLDER = "text"  # beside the staged bank version ("version") and companion ("adapters")


@dataclass(frozen=True)
class StagedText:
    """A staged version of ``NAME_text``: its folder, where its base weights are read from
    until it is published, its files' record, and what the publish hard-links into it."""

    folder: Path
    base_folder: Path  # the folder itself at create; the previous version's folder later
    files: BankTextFilesRecord
    links: dict[str, Path] = field(default_factory=dict)


def stage_first(base: BaseModel, settings: BankSettingsRecord, tokenizer: ClipTokenizer, staging: Path,
                progress: Progress) -> StagedText:
    """Version 1: the text tower exported with one all-zero slot (the base)."""
    folder = staging / STAGED_FOLDER
    folder.mkdir()
    exported = staging / "bank_text.onnx"
    blocks = len(base.text_blocks)
    with progress.step(f"exporting the bank's text encoder (rank {settings.max_rank}, {','.join(settings.matrices)} "
                       f"in {blocks} text blocks)"):
        graph = BankTextGraph(base.model, settings.matrices, settings.max_rank)
        names = export_bank_text(graph, exported, tokenizer.start_token, tokenizer.end_token)
        base_file, factors = bank_store.split_weights(onnx.load(str(exported)), names, folder)
    return StagedText(folder, folder, _files(folder, settings, base_file, factors, blocks))


def stage_next(root: Path, name: str, previous: BankManifest, slots: Slots, staged: Path) -> StagedText | None:
    """The next version of the bank's text encoder from the previous one, with `slots`' text
    stacks, its base weights left to the publish; None for a bank without open vocabulary."""
    if not previous.settings.open_vocabulary:
        return None
    check_vocabulary(previous)
    recorded = previous.files.text
    source = root / contract.text_model_name(name) / str(previous.version)
    if recorded is None:
        raise FailedPrecondition(f"bank {name!r} has open vocabulary but its manifest records no text encoder "
                                 "files: the bank is damaged; nothing published")
    checked = bank_store.check_base_files(source, {contract.BANK_BASE_WEIGHTS_FILENAME: recorded.base_weights_sha256})
    folder = staged / STAGED_FOLDER
    folder.mkdir()
    factors = bank_store.write_version(source, folder, slots.text_stacks)
    files = _files(folder, previous.settings, checked[contract.BANK_BASE_WEIGHTS_FILENAME], factors,
                   recorded.text_blocks)
    return StagedText(folder, source, files, {filename: source / filename for filename in checked})


def check_vocabulary(bank: BankManifest) -> None:
    """The gateway's tokenizer is still the one the bank's config names (written once, at
    create): FailedPrecondition otherwise, as the gateway refuses such a text encoder."""
    recorded = bank.settings.tokenizer
    found = get_tokenizer().vocab_sha256
    if recorded is None or recorded.vocab_sha256 != found:
        raise FailedPrecondition(f"bank {bank.name!r} encodes text with the vocabulary "
                                 f"{recorded.vocab_sha256[:12] if recorded else '(none recorded)'}, this cliplora's "
                                 f"tokenizer has {found[:12]}; nothing published: create a new bank")


def _files(folder: Path, settings: BankSettingsRecord, base: bank_store.StoredFile, factors: bank_store.StoredFile,
           blocks: int) -> BankTextFilesRecord:
    key = None
    if settings.target == "gpu":  # each version's TensorRT engine its own, as the bank's
        key = engine_key(base.sha256, factors.sha256)
        bank_store.stamp_graph(folder, key)
    return BankTextFilesRecord(model_sha256=sha256_file(folder / contract.MODEL_FILENAME),
                               base_weights_sha256=base.sha256, base_weights_bytes=base.bytes,
                               factors_sha256=factors.sha256, factors_bytes=factors.bytes, text_blocks=blocks,
                               tensorrt_engine_key=key)


def check_adapters(text: StagedText | None, base: BaseModel, cases: Sequence[TextCase],
                   records: Sequence[AdapterVerificationRecord],
                   reference: bank_verify.Reference) -> list[AdapterVerificationRecord]:
    """`bank add`: the added adapters' verification records with their slot of the staged
    ``NAME_text`` checked (`cliplora.export.bank_text_verify`); FailedPrecondition at the
    first that fails. Unchanged for a bank without open vocabulary."""
    if text is None:
        return list(records)
    return bank_text_verify.with_text_checks(session(text), base, cases, records, reference)


def check_base(text: StagedText | None, base: BaseModel, classes: Sequence[str], templates: Sequence[str],
               check: BaseVerificationRecord, reference: bank_verify.Reference) -> BaseVerificationRecord:
    """`bank create`: the base slot's record with slot 0 of the staged ``NAME_text`` checked."""
    if text is None:
        return check
    case = TextCase(contract.BASE_ADAPTER, None, contract.BASE_SLOT, classes, templates)
    (record,) = bank_text_verify.verify_slots(session(text), base, [case], reference)
    bank_text_verify.check_passed("the bank's base slot", record)
    return check.model_copy(update={"text": record})


def session(text: StagedText) -> onnxruntime.InferenceSession:
    """The staged text encoder in ONNX Runtime, its base weights from `text.base_folder`."""
    return create_session(text.folder / contract.MODEL_FILENAME, precision="fp32",
                          providers=["CPUExecutionProvider"],
                          initializers=bank_store.base_initializers(text.folder, bank_store.BANK_FILES,
                                                                    text.base_folder))


def with_files(files: BankFilesRecord, text: StagedText | None) -> BankFilesRecord:
    """The bank version's files record, with its text encoder's."""
    return files if text is None else files.model_copy(update={"text": text.files})


def companions(manifest: BankManifest, text: StagedText | None) -> list[publish.StagedModel]:
    """``NAME_text``, with its manifest written, to publish beside the bank (nothing without open vocabulary)."""
    if text is None:
        return []
    settings = manifest.settings
    if settings.tokenizer is None:
        raise FailedPrecondition(f"bank {manifest.name!r} has open vocabulary but records no tokenizer")
    name = contract.text_model_name(manifest.name)
    record = BankTextManifest(cliplora_version=cliplora.__version__, name=name, bank=manifest.name,
                              version=manifest.version, created=manifest.created, tokenizer=settings.tokenizer,
                              embedding_dim=settings.embedding_dim, slots=manifest.files.slots, files=text.files)
    (text.folder / contract.MANIFEST_FILENAME).write_text(record.to_json(), encoding="utf-8")
    return [publish.StagedModel(name, text.folder, bank_text_config(manifest.name, settings), text_encoder=True,
                                record=BankTextManifest, links=text.links)]
