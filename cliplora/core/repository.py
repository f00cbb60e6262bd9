"""The Triton model-repository layout, read side, and model-name rules.

```
<root>/<name>/config.pbtxt
<root>/<name>/labels.txt
<root>/<name>/<version>/model.onnx
<root>/<name>/<version>/manifest.json
```

Versions are positive integers; anything else in a model folder (a staging folder of
an export in progress, say) is not a version. Writing lives in `cliplora.export.publish`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cliplora.core import contract
from cliplora.core.bank_manifest import BankTextManifest
from cliplora.core.errors import CliploraError, InvalidArgument, NotFound
from cliplora.core.manifest import Manifest, TextEncoderManifest

MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_REPOSITORY = Path("model_repository")


def validate_model_name(name: str) -> str:
    """Return `name` if it is a valid model name (``[A-Za-z0-9_-]{1,64}``), else raise.

    The rule keeps names safe as folder names: no separators, no ``..``, no hidden files.
    """
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name):
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:80]}..."
        raise InvalidArgument(
            f"invalid model name {shown!r}: use 1-64 characters from A-Z a-z 0-9 _ -"
        )
    return name


def validate_adapter_id(adapter_id: str) -> str:
    """Return `adapter_id` if it follows the model-name rule (a bank's adapter ids name
    folders and files too), else InvalidArgument naming it."""
    if not isinstance(adapter_id, str) or not MODEL_NAME_PATTERN.fullmatch(adapter_id):
        shown = adapter_id if isinstance(adapter_id, str) and len(adapter_id) <= 80 else f"{str(adapter_id)[:80]}..."
        raise InvalidArgument(f"invalid adapter id {shown!r}: use 1-64 characters from A-Z a-z 0-9 _ -")
    return adapter_id


def parse_version(text: str) -> int | None:
    """A version folder's number, or None when the folder is not a version."""
    if text.isascii() and text.isdigit() and not text.startswith("0"):
        return int(text)
    return None


@dataclass(frozen=True)
class ModelVersion:
    """One published version of one model."""

    name: str
    version: int
    path: Path

    @property
    def model_path(self) -> Path:
        return self.path / contract.MODEL_FILENAME

    @property
    def manifest_path(self) -> Path:
        return self.path / contract.MANIFEST_FILENAME

    @property
    def precision(self) -> str:
        """The precision the version was exported in."""
        return self.manifest().precision

    def manifest(self) -> Manifest:
        """The version's manifest; NotFound without one, FailedPrecondition for a bad one."""
        return Manifest.read(self.manifest_path)


class ModelRepository:
    """Read access to a model repository folder."""

    def __init__(self, root: str | Path = DEFAULT_REPOSITORY) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / validate_model_name(name)

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and MODEL_NAME_PATTERN.fullmatch(p.name) and (p / contract.CONFIG_FILENAME).is_file()
        )

    def versions(self, name: str) -> list[int]:
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        found = (parse_version(p.name) for p in folder.iterdir() if p.is_dir())
        return sorted(v for v in found if v is not None)

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The given version of a model, or its latest one; `NotFound` otherwise."""
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.model_names()) or "none"
            raise NotFound(f"model {name!r} not found in {self.root} (models: {known})")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise NotFound(f"model {name!r} has no version {version} (versions: {versions})")
        found = ModelVersion(name, version, self.model_dir(name) / str(version))
        if not found.model_path.is_file():
            raise NotFound(f"{found.model_path} is missing")
        return found

    def text_encoder_of(self, name: str) -> str | None:
        """The classifier (or adapter bank) whose text encoder the model `name` is, or None for
        any other model."""
        try:
            found = self.get(name)
        except NotFound:
            return None
        try:
            return TextEncoderManifest.read(found.manifest_path).classifier
        except CliploraError:
            pass
        try:
            return BankTextManifest.read(found.manifest_path).bank
        except CliploraError:
            return None

    def has_text_encoder(self, name: str) -> bool:
        """True when `name` was exported with ``--open-vocabulary`` (its ``<name>_text`` is here)."""
        return self.text_encoder_of(contract.text_model_name(name)) == name

    def labels(self, name: str) -> list[str]:
        path = self.model_dir(name) / contract.LABELS_FILENAME
        try:
            return read_labels(path)
        except FileNotFoundError:
            raise NotFound(f"{path} is missing") from None


def render_labels(classes: list[str]) -> str:
    """A ``labels.txt`` / ``classes.txt``: one class name per line, in class-index order."""
    return "".join(f"{c}\n" for c in classes)


def read_labels(path: Path) -> list[str]:
    """Labels, one per line, in class-index order."""
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
