"""Top-1 accuracy, the one definition `cliplora evaluate` and `cliplora finetune` share.

Both report the same figures for the same predictions, so what training measured can
be compared with what the published, or served, model scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cliplora.core.errors import InvalidArgument


def accuracy_report(targets: Sequence[int], predicted: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Top-1 over all images and per class (classes without images are left out)."""
    targets_array, predicted_array = np.asarray(targets), np.asarray(predicted)
    if targets_array.shape != predicted_array.shape or not len(targets_array):
        raise InvalidArgument("accuracy needs one prediction per labelled image, and at least one image")
    correct = targets_array == predicted_array
    per_class = {}
    for index, name in enumerate(classes):
        members = targets_array == index
        if members.any():
            hits = int(correct[members].sum())
            per_class[name] = {"images": int(members.sum()), "correct": hits, "top1": hits / int(members.sum())}
    return {"images": len(targets_array), "correct": int(correct.sum()), "top1": float(correct.mean()),
            "per_class": per_class}


def top1_in_batches(
    paths: Sequence[Path], top1: Callable[[Sequence[Path]], list[int]], batch: int,
    update: Callable[[int, str], None] = lambda done, status: None,
) -> list[int]:
    """`top1` over `paths`, `batch` at a time: the class index predicted for each image."""
    predicted: list[int] = []
    for start in range(0, len(paths), batch):
        predicted.extend(top1(paths[start : start + batch]))
        update(min(start + batch, len(paths)), "")
    return predicted
