"""Whole-file writes: readers see the old file or the new one, never half of either.

The content goes to a hidden temporary file beside the target (same folder, so the same
file system) and is renamed over it; a failed write leaves the target untouched and
removes the temporary file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` writes the content; then it replaces `path` in one rename."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
