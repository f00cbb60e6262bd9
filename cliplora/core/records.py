"""Typed records that cross a stage boundary: one writer, one reader, one schema.

A record is a frozen pydantic model. `to_json` writes exactly the fields that were
set (a field a writer leaves out stays out, so a file read and written again is the
same file), `from_json` checks the ``schema_version`` first and then every field, and
names the file and the field at fault:

- not JSON, not an object, or a field missing or of the wrong type: FailedPrecondition
  ("<file> is not a valid <record>: base.weights.kind: Field required");
- a ``schema_version`` this cliplora does not know: FailedPrecondition, saying which
  versions it reads (a newer writer's file is refused, not half-read).

A file without ``schema_version`` is version 1: the manifests and run records written
before the field existed have version 1's required fields. Version 1 may gain optional
fields (absent: not written, read as absent), so an old file always loads; a change that
an older reader could not skip over takes a new version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from cliplora.core.errors import FailedPrecondition, NotFound


class Record(BaseModel):
    """Base of every record: frozen, no unknown fields, JSON in and out."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class VersionedRecord(Record):
    """A whole file: a record with a ``schema_version``."""

    kind: ClassVar[str] = "record"  # what the file is called in error messages
    schema_versions: ClassVar[tuple[int, ...]] = (1,)  # the versions this code reads; the last one it writes

    schema_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every field that was set, ``schema_version`` first."""
        data = self.model_dump(mode="json", exclude_unset=True)
        data.pop("schema_version", None)
        return {"schema_version": self.schema_version, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<data>") -> Self:
        if not isinstance(data, dict):
            raise FailedPrecondition(f"{source} is not a valid {cls.kind}: expected a JSON object")
        version = data.get("schema_version", 1)
        if version not in cls.schema_versions:
            known = ", ".join(str(v) for v in cls.schema_versions)
            raise FailedPrecondition(
                f"{source}: {cls.kind} schema_version {version!r} is not one this cliplora reads ({known}); "
                "it was written by another cliplora version"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or '(top)'}: {error['msg']}" for error in exc.errors()[:5]
            )
            raise FailedPrecondition(f"{source} is not a valid {cls.kind}: {problems}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "<text>") -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FailedPrecondition(f"{source} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source)

    @classmethod
    def read(cls, path: Path) -> Self:
        """The record in `path`; NotFound when there is no such file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFound(f"{path} is missing") from None
        except UnicodeDecodeError as exc:
            raise FailedPrecondition(f"{path} is not valid JSON: {exc}") from None
        return cls.from_json(text, str(path))
