"""What the `cliplora bank` commands take, checked before anything slow runs (no torch here:
the command line imports it at start-up)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cliplora.core import contract
from cliplora.core.errors import InvalidArgument, NotFound
from cliplora.core.repository import DEFAULT_REPOSITORY, MODEL_NAME_PATTERN, validate_model_name
from cliplora.export.model_config import TARGETS

MAX_RANK_LIMIT = 64
DEFAULT_PROBES = 4  # per `bank add`: 4 varied probes, each adapter checked at the export's tolerances
ADAPTERS_FILE_KEYS = {"adapter", "lora", "classes", "template"}


@dataclass(frozen=True)
class BankOptions:
    """Everything `cliplora bank create` takes (the README's "Banks")."""

    name: str
    model: str
    pretrained: str | None
    classes: Path | None = None
    templates: tuple[str, ...] = ()
    max_rank: int = 2
    matrices: tuple[str, ...] = ("q", "k", "v")
    target: str = "portable"
    open_vocabulary: bool = False  # also NAME_text: each adapter's text tower (the name fits: `_text` < `_adapters`)
    repository: Path = DEFAULT_REPOSITORY
    allow_random_weights: bool = False
    max_batch_size: int = contract.DEFAULT_MAX_BATCH_SIZE
    probes: int = DEFAULT_PROBES

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        if not MODEL_NAME_PATTERN.fullmatch(contract.adapters_model_name(self.name)):
            raise InvalidArgument(f"a bank needs the name {contract.adapters_model_name(self.name)!r} for its adapter "
                                  f"table: use a name of at most {64 - len(contract.ADAPTERS_MODEL_SUFFIX)} characters")
        if not 1 <= self.max_rank <= MAX_RANK_LIMIT:
            raise InvalidArgument(f"--max-rank must be 1..{MAX_RANK_LIMIT}, got {self.max_rank}")
        unknown = [m for m in self.matrices if m not in contract.BANK_MATRICES]
        if unknown or not self.matrices or len(set(self.matrices)) != len(self.matrices):
            raise InvalidArgument(f"--matrices must list some of {','.join(contract.BANK_MATRICES)} once each, "
                                  f"got {','.join(self.matrices)!r}")
        if self.target not in TARGETS:
            raise InvalidArgument(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not 1 <= self.max_batch_size <= 1024:
            raise InvalidArgument(f"max batch size must be 1..1024, got {self.max_batch_size}")
        if self.probes < 1:
            raise InvalidArgument("at least one probe image is needed")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to add: `--adapter ID --lora L --classes F [--template T]...`."""

    adapter: str
    lora: str
    classes: Path
    templates: tuple[str, ...] = ()


def validate_adapter_id(adapter_id: str) -> str:
    """An adapter id follows the model-name rule; ``base`` is the base model's."""
    try:
        validate_model_name(adapter_id)
    except InvalidArgument:
        raise InvalidArgument(f"invalid adapter id {adapter_id!r}: use 1-64 characters from A-Z a-z 0-9 _ -") from None
    if adapter_id == contract.BASE_ADAPTER:
        raise InvalidArgument(f"adapter id {contract.BASE_ADAPTER!r} is reserved for the bank's base model")
    return adapter_id


def read_adapters_file(path: Path) -> list[AdapterSpec]:
    """`--adapters-file`: a JSON list of {"adapter", "lora", "classes", "template": [...]};
    relative paths are relative to the file's folder."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"--adapters-file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"--adapters-file {path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument(f"--adapters-file {path} must hold a non-empty JSON list")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"adapter", "lora", "classes"} <= entry.keys() \
                or not entry.keys() <= ADAPTERS_FILE_KEYS:
            raise InvalidArgument(f"--adapters-file {path}: entry {i} must be an object with adapter, lora, classes "
                                  "and optionally template")
        templates = entry.get("template", [])
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates) \
                or not all(isinstance(entry[k], str) for k in ("adapter", "lora", "classes")):
            raise InvalidArgument(f"--adapters-file {path}: entry {i}: adapter, lora and classes are strings, "
                                  "template a list of strings")
        specs.append(AdapterSpec(entry["adapter"], str(path.parent / entry["lora"]),
                                 path.parent / entry["classes"], tuple(templates)))
    return specs


