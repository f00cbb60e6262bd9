"""`cliplora evaluate`: top-1 accuracy of published models on a labelled image set.

A model runs either in process with ONNX Runtime (the published ``model.onnx``, the
preprocessing of `cliplora predict`) or through a running gateway (``--target``), so
the accuracy of what is actually served can be compared with what training reported.
The zero-shot comparison is the base model published with ``--lora none``: evaluate
both names in one call.

`accuracy_report` is the one definition of the figures, shared with `cliplora finetune`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cliplora.datasets import LabelledImages, align_classes
from cliplora.errors import FailedPrecondition, InvalidArgument
from cliplora.progress import Progress

BATCH = 16


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


def _in_process(repository: Path, name: str, version: int | None) -> tuple[int, list[str], Callable]:
    from cliplora.preprocess import preprocess_file
    from cliplora.runtime import open_published, run_logits

    model = open_published(repository, name, version)

    def top1(paths: Sequence[Path]) -> list[int]:
        crops = np.stack([preprocess_file(p, model.image_size) for p in paths])
        return [int(i) for i in run_logits(model.session, crops).argmax(axis=1)]

    return model.found.version, model.labels(), top1


def _through_gateway(
    target: str, name: str, version: int | None, access: Mapping[str, Any]
) -> tuple[int | str, list[str], Callable]:
    """The gateway answers with every class (top_k 0), which also names them in order."""
    from serve.client import classify_files

    labels: list[str] = []

    def top1(paths: Sequence[Path]) -> list[int]:
        results = classify_files(target, name, list(paths), top_k=0, version=version or 0, **access)
        if not labels:
            ranked = results[0]["predictions"]
            labels.extend(p["label"] for p in sorted(ranked, key=lambda p: p["index"]))
        return [r["predictions"][0]["index"] for r in results]

    return version or "latest", labels, top1


def evaluate_model(
    data: LabelledImages,
    name: str,
    *,
    repository: Path | None = None,
    target: str | None = None,
    version: int | None = None,
    access: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Accuracy of one published model on `data`, in process or through the gateway at `target`
    (`access`: token and TLS keyword arguments of `serve.client.classify_files`)."""
    progress = progress or Progress(quiet=True)
    targets = None
    if target:
        answered_version, labels, top1 = _through_gateway(target, name, version, access or {})
        via = f"gateway {target}"
    else:
        if repository is None:
            raise InvalidArgument("a --repository (or a gateway --target) is needed")
        answered_version, labels, top1 = _in_process(repository, name, version)
        targets = align_classes(data, labels)  # unknown labels fail before any inference
        via = "onnxruntime"
    paths = [item.path for item in data.items]
    with progress.bar(f"evaluate {name}", len(paths)) as update:
        predicted = top1_in_batches(paths, top1, BATCH, update)
    if targets is None:  # through the gateway, the labels are known after the first answer
        targets = align_classes(data, labels)
    if len(labels) != len(set(labels)):
        raise FailedPrecondition(f"model {name} has repeated labels")
    return {"version": answered_version, "via": via, **accuracy_report(targets, predicted, labels)}
