"""Publishing a model version into a Triton model repository, atomically.

The slow work (ONNX export, verification) happens in a private temporary folder
outside the repository: Triton treats *every* folder in a repository's root as a
model, so nothing half-made may appear there. Publishing then, under an exclusive
per-model lock (``<repository>/.cliplora-<name>.lock``, a file, which Triton ignores):

- the version's files are moved into ``<repository>/<name>/.incoming-*`` (Triton
  ignores non-numeric folders inside a model) and renamed to the next version number:
  Triton never sees a half-written version;
- a new model's folder gets ``labels.txt``, its first version, and ``config.pbtxt``
  last, so a model with a config is always complete.

A failed export or publish leaves the repository as it was; concurrent exports to one
name take versions 1, 2, ... in turn. An existing model accepts a new version only if
its ``labels.txt`` stays byte-identical and its ``config.pbtxt`` means the same (same
classes, input size, precision and target): both belong to the model, not to a
version, in Triton's layout. ``config.pbtxt`` itself comes from `model_config`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from cliplora.core import contract
from cliplora.core.atomic import write_text_atomically
from cliplora.core.bank_manifest import AdapterTableManifest, BankManifest
from cliplora.core.errors import (
    CliploraError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from cliplora.core.manifest import Manifest, TextEncoderManifest
from cliplora.core.records import VersionedRecord
from cliplora.core.repository import MODEL_NAME_PATTERN, ModelRepository, validate_model_name
from cliplora.export.model_config import ModelConfig, parse_config, promotion_of, to_text


def _writable_root(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise PermissionDenied(f"cannot create model repository {root}") from None
    except (FileExistsError, NotADirectoryError):
        raise PermissionDenied(f"model repository {root} is not a folder") from None
    if not root.is_dir():
        raise PermissionDenied(f"model repository {root} is not a folder")
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionDenied(f"cannot write to model repository {root}")
    return root


def check_compatible(root: Path, name: str, config: ModelConfig | None, labels: str) -> None:
    """Stop early if `name` exists with other classes or another configuration.

    ``labels.txt`` must be byte-identical; ``config.pbtxt`` must parse to the same
    message (a config written by an older cliplora with other formatting still matches).
    """
    folder = root / validate_model_name(name)
    if not folder.exists():
        return
    labels_path = folder / contract.LABELS_FILENAME
    if labels_path.exists() and labels_path.read_text(encoding="utf-8") != labels:
        raise FailedPrecondition(
            f"model {name!r} already exists in {root} with different classes; "
            "a new version must keep them. Export under a new --name."
        )
    config_path = folder / contract.CONFIG_FILENAME
    if config is None or not config_path.exists():
        return
    try:
        existing = parse_config(config_path.read_text(encoding="utf-8"))
    except text_format.ParseError as exc:
        raise FailedPrecondition(f"{config_path} is not a valid Triton model config ({exc}); "
                                 "fix or remove it, or export under a new --name") from None
    if existing != config:
        raise FailedPrecondition(
            f"model {name!r} already exists in {root} with a different configuration (input size, "
            "precision, target, batch size); a new version must keep it. Export under a new --name."
        )


def check_names(root: Path, name: str, open_vocabulary: bool, bank: bool = False,
                promotion: contract.Promotion | None = None) -> None:
    """Refuse a name that shadows, or is shadowed by, an open-vocabulary text encoder: `x` with
    ``--open-vocabulary`` reserves ``x_text``; or a bank's companion (`check_bank_names`); or
    a bank's promoted adapter (`check_promoted_names`). Checked before the export starts, and
    again by `publish_version` under the models' locks (an export of the other name may have
    landed since)."""
    repository = ModelRepository(root)
    if open_vocabulary:
        text = contract.text_model_name(name)
        if not MODEL_NAME_PATTERN.fullmatch(text):
            raise InvalidArgument(f"--open-vocabulary needs the name {text!r} for the text encoder: "
                                  f"use a --name of at most {64 - len(contract.TEXT_MODEL_SUFFIX)} characters")
        if text in repository.model_names() and repository.text_encoder_of(text) != name:
            raise FailedPrecondition(f"{root} already has a model called {text!r}, the name the text encoder of "
                                     f"{name!r} needs; export under another --name")
    if name.endswith(contract.TEXT_MODEL_SUFFIX):
        owner = name.removesuffix(contract.TEXT_MODEL_SUFFIX)
        if owner and repository.has_text_encoder(owner):
            raise FailedPrecondition(f"{name!r} is the text encoder of the open-vocabulary model {owner!r}; "
                                     "export under another --name")
    check_bank_names(root, name, bank)
    check_promoted_names(root, name, promotion)


def bank_of(root: Path, name: str) -> str | None:
    """The bank whose companion (``<bank>_adapters``) the model `name` is, or None."""
    try:
        found = ModelRepository(root).get(name)
        return AdapterTableManifest.read(found.manifest_path).bank
    except CliploraError:
        return None


def is_bank(root: Path, name: str) -> bool:
    """True when the model `name` is an adapter bank (its latest manifest is a bank's)."""
    try:
        BankManifest.read(ModelRepository(root).get(name).manifest_path)
    except CliploraError:
        return False
    return True


def check_bank_names(root: Path, name: str, bank: bool) -> None:
    """A bank `x` reserves ``x_adapters`` (its companion), both ways round; a bank and a
    classifier never share a name."""
    models = ModelRepository(root).model_names()
    if name in models and is_bank(root, name) != bank:
        what = "an adapter bank: add adapters with `cliplora bank add`" if not bank else \
            "a model that is not an adapter bank: create the bank under another name"
        raise FailedPrecondition(f"{root} already has {name!r}, {what}")
    if bank:
        companion = contract.adapters_model_name(name)
        if companion in models and bank_of(root, companion) != name:
            raise FailedPrecondition(f"{root} already has a model called {companion!r}, the name the adapter table "
                                     f"of bank {name!r} needs; create the bank under another name")
    elif name.endswith(contract.ADAPTERS_MODEL_SUFFIX):
        owner = name.removesuffix(contract.ADAPTERS_MODEL_SUFFIX)
        if owner and (bank_of(root, name) is not None or (owner in models and is_bank(root, owner))):
            raise FailedPrecondition(f"{name!r} is the adapter table of the bank {owner!r}; "
                                     "export under another --name")


def check_promoted_names(root: Path, name: str, promotion: contract.Promotion | None) -> None:
    """A bank `x` reserves every name ``x--*`` for its promoted adapters (`cliplora bank
    promote`): such a name is published only as the promotion it spells, from a bank that is
    there, and never over a model that is another promotion or none."""
    models = ModelRepository(root).model_names()
    if promotion is not None:
        expected = contract.promoted_model_name(promotion.bank, promotion.adapter)
        if name != expected or not is_bank(root, promotion.bank):
            raise FailedPrecondition(f"{name!r} cannot be published as adapter {promotion.adapter!r} of bank "
                                     f"{promotion.bank!r} (its promoted name is {expected!r}, from a bank in {root})")
        existing = promotion_in(root, name) if name in models else promotion
        if existing is None or (existing.bank, existing.adapter) != (promotion.bank, promotion.adapter):
            raise FailedPrecondition(f"{root} already has a model called {name!r} that is not adapter "
                                     f"{promotion.adapter!r} of bank {promotion.bank!r} promoted; nothing published")
        return
    parts = name.split(contract.PROMOTED_SEPARATOR)
    for i in range(1, len(parts)):
        owner = contract.PROMOTED_SEPARATOR.join(parts[:i])
        if owner in models and is_bank(root, owner):
            raise FailedPrecondition(f"{name!r} is reserved by the adapter bank {owner!r} for its promoted adapters "
                                     f"(`cliplora bank promote {owner} --adapter ID` publishes {owner}"
                                     f"{contract.PROMOTED_SEPARATOR}ID); use another name")


def promotion_in(root: Path, name: str) -> contract.Promotion | None:
    """The promotion the config of the model `name` records (None: none, or no readable config)."""
    try:
        return promotion_of(parse_config((root / name / contract.CONFIG_FILENAME).read_text(encoding="utf-8")))
    except (OSError, text_format.ParseError, ValueError):
        return None


def preflight(root: Path, name: str, labels: str) -> None:
    """Checks that need no model: a valid name, a writable repository, the same classes."""
    validate_model_name(name)
    _writable_root(root)
    check_compatible(root, name, None, labels)


@contextmanager
def model_lock(root: Path, name: str, purpose: str = "") -> Iterator[None]:
    """An exclusive lock on `name` in `root` (``purpose`` names a second, independent lock on
    the same model: `cliplora bank` holds ``bank`` over a whole add, and takes the publishing
    lock inside it)."""
    lock_path = _writable_root(root) / f".cliplora-{purpose}{'-' if purpose else ''}{validate_model_name(name)}.lock"
    try:
        handle = open(lock_path, "a")
    except OSError as exc:
        raise PermissionDenied(f"cannot write to model repository {root}: {exc}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def staging_area() -> Iterator[Path]:
    """A private temporary folder, removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="cliplora-export-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class StagedModel:
    """One model's new version, ready to move in: its staged folder (model.onnx,
    manifest.json), its config, and its labels (None for a model without labels)."""

    name: str
    folder: Path
    config: ModelConfig
    labels: str | None = None
    text_encoder: bool = False  # its manifest is a TextEncoderManifest
    record: type[VersionedRecord] | None = None  # its manifest's record, when neither of those two
    # Files hard-linked into the version as it goes in (file name -> an existing file on the
    # repository's filesystem): a bank's base weights. Linked at the last moment because a new
    # link changes the inode of the file linked to, and Triton reloads a version whose files
    # change (docs/architecture.md, "Adapter banks").
    links: Mapping[str, Path] = field(default_factory=dict)

    @property
    def manifest(self) -> type[VersionedRecord]:
        return self.record or (TextEncoderManifest if self.text_encoder else Manifest)


def publish_version(root: Path, name: str, staged_version: Path, *, config: ModelConfig, labels: str | None,
                    companions: Sequence[StagedModel] = (), record: type[VersionedRecord] = Manifest,
                    version: int | None = None, links: Mapping[str, Path] | None = None) -> int:
    """Move a staged version folder (model.onnx, manifest.json) into the repository.

    `companions` (an open-vocabulary classifier's text encoder) get the same version
    number and go in first, so that a client that sees the classifier's new version finds
    theirs. Returns the version number, which is also stamped into every manifest, under
    the models' locks (taken in one order: the classifier's, then its companions').
    If anything fails, whatever this call put in the repository is taken out again.
    `labels` None: a model without ``labels.txt`` (a bank). `record`: the model's manifest
    record. `version`: publish exactly this version number or nothing (a bank's files name
    their version before they are published). `links`: `StagedModel.links` of the model.
    """
    main = StagedModel(name, staged_version, config, labels, record=record, links=links or {})
    models = [*companions, main]  # companions first
    with ExitStack() as locks:
        for model in sorted(models, key=lambda m: m.name != name):
            locks.enter_context(model_lock(root, model.name))
        repository = ModelRepository(root)
        check_names(root, name, any(c.text_encoder for c in companions), bank=record is BankManifest,
                    promotion=promotion_of(config))
        for model in models:
            check_compatible(root, model.name, model.config, model.labels or "")
        expected, version = version, (repository.versions(name) or [0])[-1] + 1
        if expected is not None and expected != version:
            raise FailedPrecondition(f"{name} was to get version {expected}, but its next version is {version} "
                                     "(another writer published meanwhile?); nothing published")
        for companion in companions:
            taken = [v for v in repository.versions(companion.name) if v >= version]
            if taken:
                raise FailedPrecondition(
                    f"{companion.name} already has version {taken[0]}, the version {name} would take next (an "
                    f"earlier export stopped half-way?): remove {root / companion.name / str(taken[0])} if {name} "
                    f"has no version {taken[0]}; nothing published")
        installed: list[Callable[[], None]] = []
        try:
            for model in models:
                _stamp_version(model.folder, version, model.manifest)
                installed.append(_install(root, model, version))
        except BaseException as exc:
            for undo in reversed(installed):
                undo()
            if isinstance(exc, OSError):
                raise FailedPrecondition(f"could not publish {name} into {root}, nothing published: {exc}") from exc
            raise
    return version


def _install(root: Path, model: StagedModel, version: int) -> Callable[[], None]:
    """Rename one staged version into place; returns how to take it out again."""
    folder = root / model.name
    created = not folder.exists()
    incoming = folder / f".incoming-{uuid.uuid4().hex}"
    target = folder / str(version)

    def undo() -> None:
        shutil.rmtree(folder if created else target, ignore_errors=True)

    try:
        folder.mkdir(exist_ok=True)
        shutil.move(str(model.folder), str(incoming))  # a copy when on another filesystem
        for filename, source in model.links.items():
            os.link(source, incoming / filename)
        if created and model.labels is not None:
            write_text_atomically(folder / contract.LABELS_FILENAME, model.labels)
        os.rename(incoming, target)
        if created:
            write_text_atomically(folder / contract.CONFIG_FILENAME, to_text(model.config))
    except BaseException:
        shutil.rmtree(folder if created else incoming, ignore_errors=True)
        raise
    return undo


def _stamp_version(staged_version: Path, version: int, record: type[VersionedRecord]) -> None:
    """Write the version number into the staged manifest (any record with a ``version`` field)."""
    path = staged_version / contract.MANIFEST_FILENAME
    stamped = record.read(path).model_copy(update={"version": version})
    path.write_text(stamped.to_json(), encoding="utf-8")
