"""Coverage-guided fuzzing of image decoding with atheris (libFuzzer): `make fuzz`.

Not part of `make test`. tests/test_fuzz.py throws hypothesis's structured mutations
(truncations, bit flips, lying headers) at the decoder; libFuzzer instead grows a corpus
from the inputs that reach new lines of Pillow's Python image plugins and of
`cliplora.core.preprocess`, starting from one small valid image per format.

The rule is the one tests/test_fuzz.py checks: every input ends in a uint8
[size, size, 3] crop or in `InvalidArgument` (INVALID_ARGUMENT at the gateway). Any other
exception, a crash, a hang past `-timeout` or memory past `-rss_limit_mb` is a finding:
libFuzzer stops, exits non-zero and writes the input to crash-* (timeout-*, oom-*) under
`-artifact_prefix` (`make fuzz`: bench/fuzz/).

    .venv/bin/python -m tests.fuzz_atheris -runs=50000 -timeout=10 [CORPUS_DIR ...]
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["PIL", "cliplora"]):
    import PIL.Image

    from cliplora.core.errors import InvalidArgument
    from cliplora.core.preprocess import clip_crop, decode_image

    PIL.Image.init()  # imports every format plugin now, inside the instrumentation

# Pillow warns above its own 89 MP limit; `decode_image` enforces ours (MAX_PIXELS) regardless.
warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)

MAX_PIXELS = 4_000_000  # as in tests/test_fuzz.py: real limits, small enough to stay quick


def check_one_input(data: bytes) -> None:
    """Decode and crop `data`; the crop size (16 or 32) comes from the length's parity so the
    bytes reach the decoder untouched."""
    size = 16 if len(data) % 2 else 32
    try:
        crop = clip_crop(decode_image(data, max_pixels=MAX_PIXELS), size, max_pixels=MAX_PIXELS)
    except InvalidArgument:
        return
    if crop.shape != (size, size, 3) or crop.dtype.name != "uint8":
        raise AssertionError(f"decoded to {crop.shape} {crop.dtype}, expected ({size}, {size}, 3) uint8")


SEED_FORMATS = [("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("L", "BMP"), ("RGB", "WEBP")]  # as tests/test_fuzz.py


def write_seeds(folder: Path) -> None:
    """One small valid image per format (made here: tests.factories would import torch, ten
    times this process's memory)."""
    import io

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (mode, fmt) in enumerate(SEED_FORMATS):
        pixels = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(pixels, "RGB")
        image = image.quantize(32) if mode == "P" else image.convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        (folder / f"seed-{i}.{fmt.lower()}").write_bytes(buffer.getvalue())


def main() -> None:
    """libFuzzer flags and corpus folders from the command line. The seeds go into the first
    folder, where libFuzzer also keeps what it finds, so the next run resumes from there; a
    temporary folder without one."""
    flags = [arg for arg in sys.argv[1:] if arg.startswith("-")]
    folders = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    folders = folders or [tempfile.mkdtemp(prefix="cliplora-fuzz-corpus-")]
    write_seeds(Path(folders[0]))
    atheris.Setup([sys.argv[0], *flags, *folders], check_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
