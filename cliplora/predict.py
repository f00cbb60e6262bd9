"""`cliplora predict`: a published model, in process, with ONNX Runtime.

Same preprocessing as the gateway (`cliplora.core.preprocess`), same output format
(`cliplora.core.predictions`): what Triton would answer, without Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cliplora.core.errors import InvalidArgument
from cliplora.core.predictions import rank, result_json, validate_top_k
from cliplora.core.preprocess import preprocess_file
from cliplora.core.runtime import open_published, run_logits

BATCH = 16


def predict_files(
    repository: str | Path,
    name: str,
    images: Sequence[str | Path],
    *,
    top_k: int = 5,
    version: int | None = None,
) -> list[dict[str, Any]]:
    """Classify image files with the published model; one result dict per image."""
    validate_top_k(top_k)
    if not images:
        raise InvalidArgument("no images given")
    model = open_published(repository, name, version)
    labels = model.labels()
    crops = [preprocess_file(path, model.image_size) for path in images]  # every image checked before any runs
    logits = np.concatenate([run_logits(model.session, np.stack(crops[i : i + BATCH]))
                             for i in range(0, len(crops), BATCH)])
    return [result_json(str(path), rank(row, labels, top_k)) for path, row in zip(images, logits, strict=True)]
