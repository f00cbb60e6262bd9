"""`cliplora evaluate`: top-1 accuracy of published models on a labelled image set.

A model runs either in process with ONNX Runtime (the published ``model.onnx``, the
preprocessing of `cliplora predict`) or through a running gateway (``--target``), so
the accuracy of what is actually served can be compared with what training reported.
The zero-shot comparison is the base model published with ``--lora none``: evaluate
both names in one call.

The figures are `cliplora.core.accuracy`'s, the definition `cliplora finetune` reports too.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cliplora.core import flags
from cliplora.core.accuracy import accuracy_report, top1_in_batches
from cliplora.core.datasets import LabelledImages, align_classes
from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.core.preprocess import Decoding

if TYPE_CHECKING:
    from cliplora.core.progress import Progress

BATCH = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image folder (one sub-folder per class) or path,label CSV")
    parser.add_argument("--name", action="append", required=True,
                        help="published model; repeat to compare (e.g. the --lora none base)")
    flags.add_repository(parser)
    parser.add_argument("--version", type=int, help="model version (default: latest)")
    parser.add_argument("--target", help="gateway HOST:PORT: evaluate what is served, not the file")
    flags.add_gateway_access(parser)
    flags.add_labels(parser, inline=False, purpose="to score against instead of the model's classes (needs "
                     "--open-vocabulary models)")
    flags.add_template(parser, flags.MODEL_TEMPLATES)
    flags.add_decoding(parser)
    flags.add_quiet(parser)


def run(args: argparse.Namespace) -> int:
    from cliplora.core.datasets import read_labelled_images
    from cliplora.core.progress import Progress

    if args.target and flags.decoding_given(args):
        raise InvalidArgument("--decode and --exif-orientation apply in process; through --target the gateway "
                              "decodes with its own settings")
    data = read_labelled_images(args.data)
    access = flags.gateway_access(args) if args.target else {}
    progress = Progress(quiet=args.quiet)
    labels = flags.labels(args)
    models = {
        name: evaluate_model(data, name, repository=Path(args.repository), target=args.target,
                             version=args.version, access=access, progress=progress, labels=labels,
                             templates=args.template, decoding=flags.decoding(args))
        for name in args.name
    }
    print(json.dumps({"data": data.source, "images": len(data), "models": models}, indent=2))
    return 0


def _in_process(repository: Path, name: str, version: int | None, vocabulary: Sequence[str] | None,
                templates: Sequence[str] | None, decoding: Decoding) -> tuple[int, list[str], Callable]:
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
        crops = np.stack([preprocess_file(p, model.image_size, decoding=decoding) for p in paths])
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
    decoding: Decoding = Decoding(),
) -> dict[str, Any]:
    """Accuracy of one published model on `data`, in process or through the gateway at `target`
    (`access`: token and TLS keyword arguments of `cliplora.core.client.classify_files`).

    With `labels` (a model exported with ``--open-vocabulary``), the images are scored
    against those labels at request time instead of the model's own classes: held-out
    classes the model was never exported with. `decoding` applies in process (the gateway
    decodes with its own settings)."""
    from cliplora.core.progress import Progress

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
        answered_version, labels, top1 = _in_process(repository, name, version, labels, templates, decoding)
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
