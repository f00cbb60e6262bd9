"""`cliplora predict`: a published model, in process, with ONNX Runtime.

Same preprocessing as the gateway (`cliplora.core.preprocess`), same output format
(`cliplora.core.predictions`): what Triton would answer, without Triton. ONNX Runtime is
imported when images are classified: the command line declares the flags without it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cliplora.core import flags
from cliplora.core.errors import InvalidArgument
from cliplora.core.predictions import DEFAULT_TOP_K, rank, result_json, validate_top_k
from cliplora.core.preprocess import Decoding, preprocess_file
from cliplora.core.repository import validate_adapter_id

BATCH = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_repository(parser)
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", type=int, help="model version (default: latest)")
    flags.add_top_k(parser)
    flags.add_adapter(parser)
    flags.add_labels(parser)
    flags.add_template(parser, flags.MODEL_TEMPLATES)
    flags.add_decoding(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE")


def run(args: argparse.Namespace) -> int:
    results = predict_files(args.repository, args.name, args.images, top_k=args.top_k, version=args.version,
                            labels=flags.labels(args), templates=args.template, adapter=args.adapter or "",
                            decoding=flags.decoding(args))
    print(json.dumps(results, indent=2))
    return 0


def predict_files(
    repository: str | Path,
    name: str,
    images: Sequence[str | Path],
    *,
    top_k: int = DEFAULT_TOP_K,
    version: int | None = None,
    labels: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    adapter: str = "",
    decoding: Decoding = Decoding(),
) -> list[dict[str, Any]]:
    """Classify image files with the published model; one result dict per image.

    With `labels` (a model exported with ``--open-vocabulary``) they are ranked instead
    of the model's classes, with `templates` or the model's own, as the gateway does. An
    adapter bank answers with `adapter`'s classes (empty: its base's), as the gateway does.
    `decoding`: ``--decode`` and ``--exif-orientation``.
    """
    from cliplora.core.bank_runtime import is_bank

    validate_top_k(top_k)
    if not images:
        raise InvalidArgument("no images given")
    if templates and not labels:
        raise InvalidArgument("--template goes with --labels or --labels-file")
    if is_bank(repository, name):
        return _predict_bank(repository, name, images, top_k=top_k, version=version, adapter=adapter,
                             labels=labels, templates=templates, decoding=decoding)
    if adapter:
        raise InvalidArgument(f"model {name!r} is not an adapter bank: --adapter is for banks")
    return _predict_model(repository, name, images, top_k=top_k, version=version, labels=labels, templates=templates,
                          decoding=decoding)


def _predict_model(repository: str | Path, name: str, images: Sequence[str | Path], *, top_k: int,
                   version: int | None, labels: Sequence[str] | None, templates: Sequence[str] | None,
                   decoding: Decoding) -> list[dict[str, Any]]:
    """A classifier: its own classes, or request-time labels through its text encoder."""
    from cliplora.core.runtime import (
        open_published,
        open_text_encoder,
        run_image_embeddings,
        run_logits,
    )

    model = open_published(repository, name, version)
    text = open_text_encoder(model) if labels else None
    names = list(labels) if labels else model.labels()
    heads = text.label_heads(names, templates) if text is not None else None  # bad labels fail before any image
    crops = [preprocess_file(path, model.image_size, decoding=decoding) for path in images]  # all checked first
    batches = [np.stack(crops[i : i + BATCH]) for i in range(0, len(crops), BATCH)]
    if text is None or heads is None:
        logits = np.concatenate([run_logits(model.session, batch) for batch in batches])
    else:
        logits = text.logits(np.concatenate([run_image_embeddings(model.session, batch) for batch in batches]), heads)
    return [result_json(str(path), rank(row, names, top_k)) for path, row in zip(images, logits, strict=True)]


def _predict_bank(repository: str | Path, name: str, images: Sequence[str | Path], *, top_k: int,
                  version: int | None, adapter: str, labels: Sequence[str] | None, templates: Sequence[str] | None,
                  decoding: Decoding) -> list[dict[str, Any]]:
    """A bank's adapter (empty: its base): its classes, or request-time labels through its
    slot of the bank's text encoder (``--open-vocabulary``)."""
    from cliplora.core.bank_runtime import open_bank, open_bank_text_encoder

    bank = open_bank(repository, name, version)
    record = bank.adapter(validate_adapter_id(adapter) if adapter else "")
    if labels:
        names = list(labels)
        class_embeddings = open_bank_text_encoder(repository, bank, record).label_heads(names, templates)
    elif not record.classes:
        raise InvalidArgument(f"bank {name!r} has no classes of its own: name an adapter (--adapter; "
                              "`cliplora bank list` lists them)")
    else:
        class_embeddings, names = bank.classes(record)
    crops = [preprocess_file(path, bank.image_size, decoding=decoding) for path in images]
    embeddings = np.concatenate([bank.image_embeddings(np.stack(crops[i : i + BATCH]), record)
                                 for i in range(0, len(crops), BATCH)])
    logits = bank.logits(embeddings, class_embeddings)
    return [result_json(str(path), rank(row, names, top_k)) for path, row in zip(images, logits, strict=True)]
