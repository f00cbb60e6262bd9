"""`cliplora bank add`, `bank remove` and `bank list`: a new bank version from the latest one.

No torch export: the new version's graph is the latest version's with longer factor
stacks (`cliplora.export.bank_store`), its base weights a hard link, and its companion
rebuilt from the latest companion's classes plus the new adapters'. Under the bank's own
lock (`bank_version.LOCK_PURPOSE`), from reading the latest version to publishing the
next, so two commands on one bank take turns and neither loses the other's adapters.

Adding adapters (all or none, one version): each is read (every format `export --lora`
reads), refused with the reason when the bank cannot hold it exactly
(`cliplora.model.bank_adapters.check_fits`), given the next unused slot (an existing ID is
replaced: its old slot is zeroed and retired, never reused, so a slot means one content for
good), its class embeddings computed with its own adapted text tower, and verified inside
the staged version (`cliplora.export.bank_verify`) before anything is published. An
adapter with a promotion (`cliplora bank promote`) is neither replaced nor removed until
it is demoted (`cliplora.export.bank_promotions` says why).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cliplora
from cliplora.core import contract
from cliplora.core.bank_manifest import (
    AdapterVerificationRecord,
    BankAdapterRecord,
    BankFilesRecord,
    BankManifest,
    RetiredSlotRecord,
)
from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound
from cliplora.core.progress import Progress
from cliplora.export import (
    bank_companion,
    bank_promotions,
    bank_source,
    bank_store,
    bank_text,
    bank_verify,
    bank_version,
    publish,
)
from cliplora.export.bank_create import BankResult
from cliplora.export.bank_options import DEFAULT_PROBES, AdapterSpec, validate_adapter_id
from cliplora.export.bank_text_verify import TextCase
from cliplora.model import head
from cliplora.model.adapters import NO_ADAPTER, load_adapter
from cliplora.model.bank_adapters import adapter_shape, check_fits, class_embeddings, slot_factors
from cliplora.model.base_model import BaseModel
from cliplora.model.lora import LoraAdapter


@dataclass(frozen=True)
class _Prepared:
    """An adapter read, checked and turned into what the bank stores."""

    spec: AdapterSpec
    adapter: LoraAdapter
    classes: list[str]
    templates: list[str]
    factors: dict[str, np.ndarray]
    class_embeds: np.ndarray


def add_adapters(root: Path, name: str, specs: Sequence[AdapterSpec], progress: Progress | None = None,
                 probes: int = DEFAULT_PROBES) -> BankResult:
    """Add (or replace) `specs` in one new version of bank `name`: all of them, or nothing."""
    progress = progress or Progress(quiet=True)
    started = time.perf_counter()
    ids = [validate_adapter_id(s.adapter) for s in specs]
    if not specs or len(set(ids)) != len(ids):
        raise InvalidArgument(f"give each adapter once (got {', '.join(ids) or 'none'})")
    texts = {s.adapter: (head.read_classes(s.classes), head.validate_templates(s.templates)) for s in specs}
    with publish.model_lock(root, name, bank_version.LOCK_PURPOSE):
        folder, previous = bank_version.latest(root, name)
        bank_promotions.check_not_promoted(root, name, [i for i in ids if previous.adapter(i)], "replace")
        with progress.step(f"loading the bank's base model {previous.source.model}"):
            base = bank_source.reload_source(previous.source, name)
        prepared = [_prepare(spec, *texts[spec.adapter], base, previous, progress) for spec in specs]
        slots = bank_version.load_slots(root, name, folder, previous)
        version = (previous.version or 0) + 1
        adapters, retired = _retire(previous, slots, ids, version)
        added = []
        for item in prepared:
            slot = slots.append(item.factors, bank_companion.SlotClasses(item.classes, item.class_embeds))
            added.append((item, slot))
        with publish.staging_area() as staged:
            files, bases = _write(folder, staged / "version", previous, slots)
            text = bank_text.stage_next(root, name, previous, slots, staged)  # open vocabulary: NAME_text
            with progress.step(f"verifying {len(added)} adapter(s) inside the bank ({probes} probe images)"):
                reference = bank_verify.Reference(base.model)  # one copy of the base for both towers' checks
                records = _verify(base, reference, staged / "version", folder, added, probes,
                                  previous.settings.target == "cpu-int8")
                records = bank_text.check_adapters(text, base, [TextCase(i.spec.adapter, i.adapter, s, i.classes,
                                                                         i.templates) for i, s in added], records,
                                                   reference)
            adapters += [_record(item, slot, version, check) for (item, slot), check in zip(added, records, strict=True)]
            manifest = _manifest(previous, version, f"add {', '.join(ids)}", adapters, retired,
                                 bank_text.with_files(files, text), started)
            with progress.step(f"publishing version {version} of bank {name}"):
                published = bank_version.publish_bank(root, manifest, slots, staged, _links(folder, bases),
                                                      bank_text.companions(manifest, text))
    return BankResult(name, published, root / name / str(published), manifest)


def remove_adapter(root: Path, name: str, adapter_id: str, progress: Progress | None = None) -> BankResult:
    """A new version of bank `name` without `adapter_id` (its slot zeroed and retired)."""
    progress = progress or Progress(quiet=True)
    started = time.perf_counter()
    validate_adapter_id(adapter_id)
    with publish.model_lock(root, name, bank_version.LOCK_PURPOSE):
        folder, previous = bank_version.latest(root, name)
        if previous.adapter(adapter_id) is None:
            known = ", ".join(a.adapter for a in previous.adapters[1:]) or "none"
            raise NotFound(f"bank {name!r} has no adapter {adapter_id!r} (adapters: {known})")
        bank_promotions.check_not_promoted(root, name, [adapter_id], "remove")
        slots = bank_version.load_slots(root, name, folder, previous)
        version = (previous.version or 0) + 1
        adapters, retired = _retire(previous, slots, [adapter_id], version)
        with publish.staging_area() as staged:
            files, bases = _write(folder, staged / "version", previous, slots)
            text = bank_text.stage_next(root, name, previous, slots, staged)
            manifest = _manifest(previous, version, f"remove {adapter_id}", adapters, retired,
                                 bank_text.with_files(files, text), started)
            with progress.step(f"publishing version {version} of bank {name}"):
                published = bank_version.publish_bank(root, manifest, slots, staged, _links(folder, bases),
                                                      bank_text.companions(manifest, text))
    return BankResult(name, published, root / name / str(published), manifest)


def list_adapters(root: Path, name: str) -> list[dict[str, object]]:
    """`cliplora bank list`: one object per adapter of the latest version, the base first, with
    the classifier it is promoted to ("" when it is not: `cliplora.export.bank_promotions`)."""
    manifest = bank_version.latest(root, name)[1]
    promoted = bank_promotions.promoted_to(root, manifest)
    return [{**a.listing(), "promoted_to": promoted.get(a.adapter, "")} for a in manifest.adapters]


def _prepare(spec: AdapterSpec, classes: list[str], templates: list[str], base: BaseModel, bank: BankManifest,
             progress: Progress) -> _Prepared:
    what = f"adapter {spec.adapter!r} ({spec.lora})"
    if spec.lora == NO_ADAPTER:
        raise InvalidArgument(f"{what}: --lora none adds nothing; the base model is the bank's slot 0 ('base')")
    with progress.step(f"reading {what}"):  # recorded as an absolute path: `bank promote` reads it from anywhere
        adapter = load_adapter(str(Path(spec.lora).absolute()), len(base.text_blocks), len(base.vision_blocks))
    assert adapter is not None
    settings = bank.settings
    check_fits(adapter, base.model, settings.matrices, settings.max_rank, what, settings.towers)
    with progress.step(f"encoding {len(classes) * len(templates)} prompts with {spec.adapter}'s text tower"):
        class_embeds = class_embeddings(base.model, adapter, base.tokenizer, classes, templates)
    return _Prepared(spec, adapter, classes, templates,
                     slot_factors(adapter, base.model, settings.matrices, settings.max_rank, settings.towers),
                     class_embeds)


def _retire(previous: BankManifest, slots: bank_version.Slots, ids: Sequence[str], version: int) \
        -> tuple[list[BankAdapterRecord], list[RetiredSlotRecord]]:
    """The previous version's adapters without `ids`, and the retired slots with theirs (zeroed in `slots`)."""
    kept, retired = [], list(previous.retired)
    for adapter in previous.adapters:
        if adapter.adapter in ids:
            slots.clear(adapter.slot)
            retired.append(RetiredSlotRecord(slot=adapter.slot, adapter=adapter.adapter,
                                             lora_sha256=adapter.lora_sha256, version_retired=version))
        else:
            kept.append(adapter)
    return kept, retired


def _write(previous: Path, folder: Path, bank: BankManifest, slots: bank_version.Slots) \
        -> tuple[BankFilesRecord, dict[str, bank_store.StoredFile]]:
    """The new version's files in `folder`, but its base weights (linked when it is published),
    their record, and the checked base weights files to link."""
    folder.mkdir()
    shas = {contract.BANK_BASE_WEIGHTS_FILENAME: bank.files.base_weights_sha256}
    fp32_sha = bank.files.fp32_base_weights_sha256
    graphs = [bank_store.BANK_FILES]
    if bank.settings.target == "cpu-int8":
        if fp32_sha is None:
            raise FailedPrecondition(f"bank {bank.name!r} is cpu-int8 but records no fp32 bank; nothing published")
        shas[bank_store.FP32_BASE_WEIGHTS_FILENAME] = fp32_sha
        graphs.append(bank_store.FP32_FILES)
    bases = bank_store.check_base_files(previous, shas)
    factors = bank_store.write_version(previous, folder, slots.stacks, graphs)
    key = None
    if bank.settings.target == "gpu":
        key = bank_version.engine_key(bank.files.base_weights_sha256, factors.sha256)
        bank_store.stamp_graph(folder, key)
    base = bases[contract.BANK_BASE_WEIGHTS_FILENAME]
    return bank_version.files_record(folder, base, factors, slots.count, key, fp32_sha), bases


def _links(previous: Path, bases: Mapping[str, bank_store.StoredFile]) -> dict[str, Path]:
    """The checked base weights files, hard-linked into the new version as it is published."""
    return {filename: previous / filename for filename in bases}


def _verify(base: BaseModel, reference: bank_verify.Reference, folder: Path, previous: Path,
            added: Sequence[tuple[_Prepared, int]], count: int, int8: bool) -> list[AdapterVerificationRecord]:
    """Each added adapter checked in the staged version (its base weights read from the
    previous version's files); FailedPrecondition at the first that fails."""
    sample = bank_verify.probes(base.image_size, count)
    fp32, int8_session = bank_version.sessions(folder, previous, int8)
    n = len(sample.crops)
    alone = {slot: bank_verify.embed(fp32, sample.crops, [slot] * n)
             for slot in (contract.BASE_SLOT, *(s for _, s in added))}
    mixed = bank_verify.mixed_batch_errors(fp32, sample.crops, alone, base.logit_scale)
    records = []
    for item, slot in added:
        int8_embeds = bank_verify.embed(int8_session, sample.crops, [slot] * n) if int8_session else None
        case = bank_verify.AdapterCase(item.spec.adapter, item.adapter, slot, item.classes, item.templates,
                                       item.class_embeds, alone[slot], int8_embeds)
        record = bank_verify.check_adapter(case, base, reference, sample, alone[contract.BASE_SLOT], mixed[slot])
        if not record.passed:
            raise FailedPrecondition(f"adapter {item.spec.adapter!r} failed its verification inside the bank, "
                                     f"nothing published: {'; '.join(bank_verify.failures(record))}")
        records.append(record)
    return records


def _record(item: _Prepared, slot: int, version: int, check: AdapterVerificationRecord) -> BankAdapterRecord:
    shape = adapter_shape(item.adapter)
    return BankAdapterRecord(adapter=item.spec.adapter, slot=slot, version_added=version, classes=item.classes,
                             templates=item.templates, lora=item.adapter.record(), rank=shape.rank,
                             matrices=list(shape.matrices), encoders=list(shape.encoders), verification=check)


def _manifest(previous: BankManifest, version: int, change: str, adapters: list[BankAdapterRecord],
              retired: list[RetiredSlotRecord], files: BankFilesRecord, started: float) -> BankManifest:
    return previous.model_copy(update={
        "cliplora_version": cliplora.__version__, "version": version, "created": bank_version.now(), "change": change,
        "adapters": sorted(adapters, key=lambda a: a.slot), "retired": retired, "files": files,
        "environment": bank_version.environment(), "seconds": round(time.perf_counter() - started, 2)})
