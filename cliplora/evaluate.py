"""`cliplora evaluate`: top-1 accuracy of published models on a labelled image set.

A model runs either in process with ONNX Runtime (the published ``model.onnx``, the
preprocessing of `cliplora predict`) or through a running gateway (``--target``), so
the accuracy of what is actually served can be compared with what training reported.
The zero-shot comparison is the base model published with ``--lora none``: evaluate
both names in one call.

The figures are `cliplora.core.accuracy`'s, the definition `cliplora finetune` reports too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cliplora.core.accuracy import accuracy_report, top1_in_batches
from cliplora.core.datasets import LabelledImages, align_classes
from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.core.progress import Progress

BATCH = 16


def _in_process(repository: Path, name: str, version: int | None,
                vocabulary: Sequence[str] | None, templates: Sequence[str] | None) -> tuple[int, list[str], Callable]:
    from cliplora.core.preprocess import preprocess_file
    from cliplora.core.runtime import (
        open_published,
        open_text_encoder,
        run_image_embeddings,
        run_logits,
    )

    model = open_published(repository, name, version)
    text = open_text_encoder(model) if vocabulary else None
    heads = text.label_heads(vocabulary, templates) if text is not None and vocabulary else None

    def top1(paths: Sequence[Path]) -> list[int]:
        crops = np.stack([preprocess_file(p, model.image_size) for p in paths])
        if text is None or heads is None:
            logits = run_logits(model.session, crops)
        else:
            logits = text.logits(run_image_embeddings(model.session, crops), heads)
        return [int(i) for i in logits.argmax(axis=1)]

    return model.found.version, list(vocabulary) if vocabulary else model.labels(), top1


def _through_gateway(
    target: str, name: str, version: int | None, access: Mapping[str, Any],
    vocabulary: Sequence[str] | None, templates: Sequence[str] | None,
) -> tuple[int | str, list[str], Callable]:
    """The gateway answers with every class (top_k 0), which also names them in order."""
    from cliplora.core.client import classify_files

    labels: list[str] = []

    def top1(paths: Sequence[Path]) -> list[int]:
        results = classify_files(target, name, list(paths), top_k=0, version=version or 0, labels=vocabulary,
                                 templates=templates, **access)
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
    labels: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy of one published model on `data`, in process or through the gateway at `target`
    (`access`: token and TLS keyword arguments of `cliplora.core.client.classify_files`).

    With `labels` (a model exported with ``--open-vocabulary``), the images are scored
    against those labels at request time instead of the model's own classes: held-out
    classes the model was never exported with."""
    progress = progress or Progress(quiet=True)
    targets = None
    if labels is not None:
        targets = align_classes(data, labels)  # unknown labels fail before any inference
    if target:
        answered_version, labels, top1 = _through_gateway(target, name, version, access or {}, labels, templates)
        via = f"gateway {target}"
    else:
        if repository is None:
            raise InvalidArgument("a --repository (or a gateway --target) is needed")
        answered_version, labels, top1 = _in_process(repository, name, version, labels, templates)
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
