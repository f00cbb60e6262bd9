"""A bank's promotions: which adapters are served by a merged classifier ``NAME--ID``,
the rule that keeps them true, and `cliplora bank demote`.

The record of a promotion is the promoted classifier itself: its ``config.pbtxt`` names
the bank, the adapter and the adapter's content hash (`cliplora.core.contract.Promotion`),
which is also all the gateway reads (through Triton). There is no second record to drift
from it, and nothing is written into the bank's own folder: Triton, polling, reloads a
model whose folder changes, and a bank reload is a base-model load (measured with the
local Triton: a file written into a bank's folder made it reload the loaded version).

An adapter with a promotion is not removed or replaced in the bank (`check_not_promoted`):
the command is refused, naming the demote to run first. Replacing it in the bank alone
would leave the promoted classifier answering nothing (the gateway routes only to a
promotion whose hash matches the bank's table) while still loaded; demoting silently
would take a hot adapter off its merged path without anyone deciding so.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cliplora.core import contract
from cliplora.core.bank_manifest import BankManifest
from cliplora.core.errors import FailedPrecondition, NotFound
from cliplora.core.repository import ModelRepository, validate_adapter_id
from cliplora.export import bank_version, publish


@dataclass(frozen=True)
class Demotion:
    """What `cliplora bank demote` took out of the repository."""

    bank: str
    adapter: str
    model: str  # NAME--ID
    versions: tuple[int, ...]  # its versions, all removed
    text_model: str | None  # its text encoder, removed too (promoted from a bank with open vocabulary)


def promotion_of(root: Path, bank: str, adapter: str) -> contract.Promotion | None:
    """The promotion of `adapter` of `bank` in `root` (whatever content it was promoted
    from), or None: no model ``bank--adapter``, or one that is not that promotion."""
    found = publish.promotion_in(root, contract.promoted_model_name(bank, adapter))
    return found if found is not None and (found.bank, found.adapter) == (bank, adapter) else None


def promoted_to(root: Path, manifest: BankManifest) -> dict[str, str]:
    """{adapter id: its promoted classifier} for the bank version's adapters promoted from
    the content that version holds (what the gateway routes to)."""
    found = {}
    for record in manifest.adapters[1:]:
        promotion = promotion_of(root, manifest.name, record.adapter)
        if promotion is not None and promotion.lora_sha256 == record.lora_sha256:
            found[record.adapter] = contract.promoted_model_name(manifest.name, record.adapter)
    return found


def check_not_promoted(root: Path, bank: str, ids: Sequence[str], doing: str) -> None:
    """FailedPrecondition when one of `ids` has a promotion (`doing`: what was refused)."""
    promoted = [i for i in ids if promotion_of(root, bank, i) is not None]
    if promoted:
        first = promoted[0]
        raise FailedPrecondition(
            f"cannot {doing} adapter {first!r} of bank {bank!r}: it is promoted to "
            f"{contract.promoted_model_name(bank, first)!r}; run `cliplora bank demote {bank} --adapter {first}` "
            "first (and `bank promote` again afterwards if it should stay merged); nothing published")


def demote_adapter(root: Path, bank: str, adapter_id: str) -> Demotion:
    """`cliplora bank demote`: remove the promoted classifier ``bank--adapter_id`` (every
    version, then its text encoder if it has one); NotFound when there is no such promotion."""
    validate_adapter_id(adapter_id)
    model = contract.promoted_model_name(bank, adapter_id)
    with publish.model_lock(root, bank, bank_version.LOCK_PURPOSE), publish.model_lock(root, model):
        if promotion_of(root, bank, adapter_id) is None:
            if not publish.is_bank(root, bank):
                raise NotFound(f"no bank {bank!r} in {root} (and no model {model!r} promoted from one)")
            raise NotFound(f"adapter {adapter_id!r} of bank {bank!r} is not promoted (no model {model!r} promoted "
                           f"from it in {root}); nothing changed")
        versions = remove_model(root, model)
        text = contract.text_model_name(model)
        has_text = ModelRepository(root).text_encoder_of(text) == model
        if has_text:
            with publish.model_lock(root, text):
                remove_model(root, text)
    return Demotion(bank, adapter_id, model, tuple(versions), text if has_text else None)


def remove_model(root: Path, name: str) -> list[int]:
    """Take the model `name` out of the repository; returns the versions it had.

    In an order Triton's polling never sees half of: the versions go first, the oldest
    first (each by one rename to a hidden name, so the one serving is not replaced by an
    older one), so the model stops being ready; its ``config.pbtxt`` goes last, so a folder
    still there is still a whole model and the removal can be run again. Requests in flight
    finish: Triton unloads a version only after them."""
    folder = root / name
    if not folder.is_dir():
        raise NotFound(f"{folder} is not a model folder")
    versions = ModelRepository(root).versions(name)
    for version in versions:
        os.rename(folder / str(version), folder / f".removing-{uuid.uuid4().hex}-{version}")
    config = folder / contract.CONFIG_FILENAME
    for path in sorted(folder.iterdir()):
        if path == config:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    config.unlink(missing_ok=True)
    folder.rmdir()
    return versions
