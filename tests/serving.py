"""Helpers for serving tests: free ports, tiny published models, PNG headers that lie."""

from __future__ import annotations

import socket
import struct
import zlib
from pathlib import Path

from export.pipeline import ExportOptions, run_export
from tests import factories

CLASSES = ["cat", "dog", "red_panda", "golden_retriever", "tabby"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def publish_tiny_models(root: Path, config: Path) -> Path:
    """`base` and `lora` (same classes) in `root/repo`; returns the repository."""
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    lora = factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="all", params=("q", "v"))
    common = dict(model=str(config), pretrained=None, classes=classes, templates=("a photo of a {}.",),
                  repository=root / "repo", allow_random_weights=True, probes=4)
    run_export(ExportOptions(lora="none", name="base", **common))
    run_export(ExportOptions(lora=str(lora), name="lora", **common))
    return root / "repo"


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height and carries almost no data (a decompression bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def encoded(image, fmt: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()
