"""`cliplora predict`: a published model, in process, with ONNX Runtime.

Same preprocessing as the gateway (`cliplora.preprocess`), same output format
(`cliplora.predictions`): what Triton would answer, without Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cliplora.errors import FailedPrecondition, InvalidArgument
from cliplora.predictions import rank, result_json, validate_top_k
from cliplora.preprocess import preprocess_file
from cliplora.repository import ModelRepository
from cliplora.runtime import create_session, run_logits

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
    repo = ModelRepository(repository)
    found = repo.get(name, version)
    labels = repo.labels(name)
    session = create_session(found.model_path, precision=found.precision)
    shape = session.get_inputs()[0].shape
    size = int(shape[1])
    output_classes = session.get_outputs()[0].shape[1]
    if output_classes != len(labels):
        raise FailedPrecondition(f"{found.model_path} has {output_classes} outputs but labels.txt has {len(labels)} lines")

    crops = [preprocess_file(path, size) for path in images]  # every image checked before any runs
    logits = np.concatenate([run_logits(session, np.stack(crops[i : i + BATCH])) for i in range(0, len(crops), BATCH)])
    return [result_json(str(path), rank(row, labels, top_k)) for path, row in zip(images, logits, strict=True)]
