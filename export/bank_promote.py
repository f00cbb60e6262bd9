"""`cliplora bank promote`: a bank's adapter served merged, as the classifier ``NAME--ID``.

The ordinary export (`cliplora.export.pipeline.run_export`, all its verification) of what
the bank's latest version holds for the adapter, under the bank's lock (no `bank add` or
`remove` can change the adapter meanwhile):

- the base model `bank create` recorded, refused if its weights or model config changed
  (`cliplora.export.bank_source.reload_source`, as `bank add`);
- the adapter's LoRA file (or PEFT folder) as the bank recorded it: refused, naming it,
  when it is missing or its sha256 is no longer the recorded one (and the export checks
  once more that the adapter it reads is that content);
- the adapter's classes and templates, the bank's target and max batch size, and
  ``--open-vocabulary`` when the bank has it;
- ``cpu-int8``: the bank gates each adapter's INT8 answers on the generated probe images
  alone (`bank add` takes no calibration images), so the promotion does the same
  (``--uncalibrated``) unless it is given ``--calibration DIR``;
- the config names the promotion (`cliplora.core.contract.Promotion`): the gateway routes
  ``model=NAME, adapter=ID`` there while it is ready and names the content the bank holds.

Promoting an adapter already promoted from the content the bank holds changes nothing.
What is promoted, and `bank demote`: `cliplora.export.bank_promotions`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cliplora.core import contract
from cliplora.core.bank_manifest import BankAdapterRecord, BankManifest
from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound
from cliplora.core.hashing import sha256_file, sha256_tree
from cliplora.core.progress import Progress
from cliplora.core.repository import MODEL_NAME_PATTERN, ModelRepository, validate_adapter_id
from cliplora.export import bank_source, bank_version, publish
from cliplora.export.options import ExportOptions
from cliplora.export.pipeline import ExportResult, run_export


@dataclass(frozen=True)
class PromotionResult:
    promotion: contract.Promotion
    model: str  # NAME--ID
    export: ExportResult | None  # None: it was promoted already, from the same content


def promote_adapter(root: Path, bank: str, adapter_id: str, progress: Progress | None = None, *,
                    probes: int = ExportOptions.probes, calibration: Path | None = None) -> PromotionResult:
    """Export adapter `adapter_id` of bank `bank` as the classifier ``bank--adapter_id``."""
    progress = progress or Progress(quiet=True)
    with publish.model_lock(root, bank, bank_version.LOCK_PURPOSE):
        _, manifest = bank_version.latest(root, bank)
        record = promotable(manifest, adapter_id)
        promotion = contract.Promotion(bank, adapter_id, record.lora_sha256)
        model = promoted_name(promotion)
        if already_promoted(root, promotion):
            progress.info(f"adapter {adapter_id!r} of bank {bank!r} is promoted to {model!r} already")
            return PromotionResult(promotion, model, None)
        if calibration is not None and manifest.settings.target != "cpu-int8":
            raise InvalidArgument(f"--calibration feeds the INT8 gate of a cpu-int8 bank's promotion; bank {bank!r} "
                                  f"is {manifest.settings.target}")
        lora = checked_lora(bank, record)
        with progress.step(f"loading the bank's base model {manifest.source.model}"):
            base = bank_source.reload_source(manifest.source, bank)
        with tempfile.TemporaryDirectory(prefix="cliplora-promote-") as folder:
            classes = Path(folder) / "classes.json"
            classes.write_text(json.dumps(record.classes), encoding="utf-8")
            options = export_options(root, manifest, record, promotion, lora, classes, probes, calibration)
            progress.info(f"promoting adapter {adapter_id!r} of bank {bank!r} as {model!r} "
                          f"({options.target}{', INT8 gated on the probe images' if options.uncalibrated else ''})")
            result = run_export(options, progress, base=base)
    return PromotionResult(promotion, model, result)


def promotable(manifest: BankManifest, adapter_id: str) -> BankAdapterRecord:
    """The adapter's record in the bank's latest version; refused for the base and unknown ids."""
    validate_adapter_id(adapter_id)
    if adapter_id == contract.BASE_ADAPTER:
        raise InvalidArgument(f"{contract.BASE_ADAPTER!r} is bank {manifest.name!r}'s base model, not an adapter: "
                              "there is nothing to promote (export the base model with `cliplora export --lora none`)")
    record = manifest.adapter(adapter_id)
    if record is None:
        known = ", ".join(a.adapter for a in manifest.adapters[1:]) or "none"
        raise NotFound(f"bank {manifest.name!r} has no adapter {adapter_id!r} (adapters: {known})")
    if record.lora is None or not record.lora_sha256:
        raise FailedPrecondition(f"bank {manifest.name!r} records no LoRA file for adapter {adapter_id!r}")
    return record


def promoted_name(promotion: contract.Promotion) -> str:
    """``NAME--ID``, refused when it does not fit the model-name rule."""
    name = contract.promoted_model_name(promotion.bank, promotion.adapter)
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(f"adapter {promotion.adapter!r} of bank {promotion.bank!r} would be promoted as {name!r}, "
                              f"{len(name)} characters: a model name has at most 64 (bank name, "
                              f"{contract.PROMOTED_SEPARATOR!r} and adapter id together); serve it from the bank")
    return name


def already_promoted(root: Path, promotion: contract.Promotion) -> bool:
    """True when ``NAME--ID`` is this promotion already; FailedPrecondition when the name is
    taken by anything else (another model, another promotion, an earlier content)."""
    name = contract.promoted_model_name(promotion.bank, promotion.adapter)
    if not (root / name).exists():
        return False
    found = publish.promotion_in(root, name)
    if name not in ModelRepository(root).model_names() or found is None:
        raise FailedPrecondition(f"{root / name} exists and is not a promoted adapter: the name adapter "
                                 f"{promotion.adapter!r} of bank {promotion.bank!r} needs; nothing published")
    if (found.bank, found.adapter) != (promotion.bank, promotion.adapter):
        raise FailedPrecondition(f"{name!r} is adapter {found.adapter!r} of bank {found.bank!r} promoted, the name "
                                 f"adapter {promotion.adapter!r} of bank {promotion.bank!r} needs; nothing published")
    if found.lora_sha256 != promotion.lora_sha256:
        raise FailedPrecondition(
            f"{name!r} holds an earlier content of adapter {promotion.adapter!r} (sha256 {found.lora_sha256[:12]}, "
            f"the bank holds {promotion.lora_sha256[:12]}): run `cliplora bank demote {promotion.bank} --adapter "
            f"{promotion.adapter}` first; nothing published")
    return True


def checked_lora(bank: str, record: BankAdapterRecord) -> Path:
    """The adapter's LoRA file (or PEFT folder) as `bank add` read it: there, and the same content."""
    assert record.lora is not None and record.lora.format != "none"
    path, recorded = Path(record.lora.source), record.lora_sha256
    what = f"the LoRA {'folder' if record.lora.format == 'peft' else 'file'} {path} of adapter " \
           f"{record.adapter!r} of bank {bank!r}"
    where = "" if path.is_absolute() else f" (recorded relative to where `bank add` ran; looked up from {Path.cwd()})"
    if not path.exists():
        raise NotFound(f"{what} is missing{where}; nothing published: restore it (sha256 {recorded[:12]}) or "
                       "`bank add` the adapter again")
    found = sha256_tree(path) if path.is_dir() else sha256_file(path)
    if found != recorded:
        raise FailedPrecondition(f"{what} changed since `bank add` (sha256 {found[:12]}, recorded {recorded[:12]}); "
                                 "nothing published: restore it, or `bank add` it again and then promote")
    return path


def export_options(root: Path, manifest: BankManifest, record: BankAdapterRecord, promotion: contract.Promotion,
                   lora: Path, classes: Path, probes: int, calibration: Path | None) -> ExportOptions:
    """The export of the adapter as the bank serves it (base, classes, templates, target)."""
    source, settings = manifest.source, manifest.settings
    return ExportOptions(
        model=source.model, pretrained=source.pretrained, lora=str(lora), classes=classes,
        templates=tuple(record.templates), name=contract.promoted_model_name(promotion.bank, promotion.adapter),
        repository=root, target=settings.target, allow_random_weights=source.allow_random_weights,
        max_batch_size=settings.max_batch_size, probes=probes, open_vocabulary=settings.open_vocabulary,
        calibration=calibration, uncalibrated=settings.target == "cpu-int8" and calibration is None,
        promotion=promotion)
