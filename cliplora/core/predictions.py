"""Logits -> the ranked predictions every command prints (the README's "Predict").

``{"label", "index", "score", "logit"}`` sorted by logit, highest first; ``score`` is
the softmax over *all* classes, ``logit`` is ``logit_scale · cosine``; ``top_k = 0``
lists every class. `predict`, the gateway and `classify` all format through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cliplora.core.errors import InvalidArgument

MAX_TOP_K = 100_000
DEFAULT_TOP_K = 5  # predictions per image unless asked (`--top-k`)


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float
    logit: float


def validate_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be an integer in 0..{MAX_TOP_K} (0 = all classes), got {top_k!r}")
    return top_k


def rank(logits: np.ndarray, labels: Sequence[str], top_k: int) -> list[Prediction]:
    """The `top_k` best classes of one image's logits (`top_k` 0: all)."""
    validate_top_k(top_k)
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    if row.shape[0] != len(labels):
        raise ValueError(f"{row.shape[0]} logits for {len(labels)} labels")
    shifted = np.exp(row - row.max())
    scores = shifted / shifted.sum()
    order = np.argsort(-row, kind="stable")
    if top_k:
        order = order[:top_k]
    return [Prediction(labels[i], int(i), float(scores[i]), float(row[i])) for i in order]


def result_json(image: str, predictions: Sequence[Prediction]) -> dict[str, Any]:
    return {"image": image, "predictions": [asdict(p) for p in predictions]}
