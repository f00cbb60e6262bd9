"""The gateway's gRPC client: `cliplora classify`, `cliplora evaluate --target`, the load tests.

It prints what `cliplora predict` prints (`cliplora.core.predictions`), carries the
bearer token (``CLIPLORA_TOKEN``) and speaks TLS when given a CA. Core, because more
than one stage calls the gateway and no stage may import another.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from cliplora.core.errors import CliploraError, InvalidArgument
from cliplora.core.predictions import DEFAULT_TOP_K, Prediction, result_json, validate_top_k
from cliplora.core.preprocess import read_image_bytes
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_BATCH = 16
TEXT_BATCH = 256  # texts per Embed call (the gateway's --max-labels is 1000 by default)
TOKEN_ENV = "CLIPLORA_TOKEN"
DEFAULT_TIMEOUT_S = 30.0  # the deadline of each call (`--timeout`)


class RemoteError(CliploraError):
    """A status the gateway answered with; keeps its code name."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code.name  # type: ignore[misc]


def token_metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    """``authorization`` metadata from `token` or ``CLIPLORA_TOKEN``; empty without either."""
    token = token or os.environ.get(TOKEN_ENV, "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def client_channel(target: str, *, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                   options: list[tuple[str, int]] | None = None, aio: bool = False):
    """A channel to the gateway: TLS when `ca` is given (client certificate with cert/key)."""
    module = grpc.aio if aio else grpc
    if ca is None:
        return module.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    return module.secure_channel(target, credentials, options=options)


def classify_files(
    target: str,
    model: str,
    images: Sequence[str | Path],
    *,
    top_k: int = DEFAULT_TOP_K,
    version: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    batch: int = DEFAULT_BATCH,
    labels: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    adapter: str = "",
    token: str | None = None,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> list[dict[str, Any]]:
    """Classify image files through the gateway at `target` (HOST:PORT).

    `labels` (and `templates`) rank request-time labels instead of the model's classes
    (a model exported with ``--open-vocabulary``); `adapter` names one adapter of a bank.
    The bearer token comes from `token` or ``CLIPLORA_TOKEN``; `tls_ca` switches to TLS
    (with `tls_cert`/`tls_key` for mutual TLS). The batches after the first ask for the version that answered it (version 0: the
    latest), so a version published meanwhile does not split one run over two models.
    """
    validate_top_k(top_k)
    if not images:
        raise InvalidArgument("no images given")
    if templates and not labels:
        raise InvalidArgument("--template goes with --labels or --labels-file")
    payloads = [read_image_bytes(p) for p in images]
    results: list[dict[str, Any]] = []
    with _stub(target, tls_ca, tls_cert, tls_key) as stub:
        for start in range(0, len(payloads), batch):
            request = pb.ClassifyRequest(model=model, version=version, top_k=top_k,
                                         images=[pb.Image(encoded=data) for data in payloads[start : start + batch]],
                                         labels=list(labels or ()), templates=list(templates or ()),
                                         adapter=adapter)
            response = _call(stub.Classify, request, timeout_s, token)
            version = version or response.version  # one version for every batch of the run
            for path, result in zip(images[start : start + batch], response.results, strict=True):
                predictions = [Prediction(p.label, p.index, p.score, p.logit) for p in result.predictions]
                results.append(result_json(str(path), predictions))
    return results


def embed_files(
    target: str,
    model: str,
    images: Sequence[str | Path] = (),
    texts: Sequence[str] = (),
    *,
    version: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    batch: int = DEFAULT_BATCH,
    adapter: str = "",
    token: str | None = None,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> list[dict[str, Any]]:
    """Embeddings through the gateway: ``{"image": PATH, "embedding": [...]}`` for each image,
    then ``{"text": S, "embedding": [...]}`` for each text, in the order given (with
    `adapter`, of that adapter of a bank). The calls
    after the first ask for the version that answered it, so that a version published in
    between cannot mix two models' embeddings."""
    if not images and not texts:
        raise InvalidArgument("nothing to embed: give images and/or --text")
    payloads = [read_image_bytes(p) for p in images]
    results: list[dict[str, Any]] = []
    with _stub(target, tls_ca, tls_cert, tls_key) as stub:
        for start in range(0, len(payloads), batch):
            request = pb.EmbedRequest(model=model, version=version, adapter=adapter,
                                      images=[pb.Image(encoded=data) for data in payloads[start : start + batch]])
            response = _call(stub.Embed, request, timeout_s, token)
            version = version or response.version
            results += [{"image": str(path), "embedding": list(e.values)}
                        for path, e in zip(images[start : start + batch], response.images, strict=True)]
        texts = list(texts)
        for start in range(0, len(texts), TEXT_BATCH):
            request = pb.EmbedRequest(model=model, version=version, adapter=adapter,
                                      texts=texts[start : start + TEXT_BATCH])
            response = _call(stub.Embed, request, timeout_s, token)
            version = version or response.version
            results += [{"text": text, "embedding": list(e.values)}
                        for text, e in zip(texts[start : start + TEXT_BATCH], response.texts, strict=True)]
    return results


@contextmanager
def _stub(target: str, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> Iterator[Any]:
    options = [("grpc.max_send_message_length", 256 * 1024 * 1024), ("grpc.max_receive_message_length", 256 << 20)]
    with client_channel(target, ca=tls_ca, cert=tls_cert, key=tls_key, options=options) as channel:
        yield pb_grpc.ClassifierStub(channel)


def _call(method: Callable[..., Any], request: Any, timeout_s: float, token: str | None) -> Any:
    try:
        return method(request, timeout=timeout_s, metadata=token_metadata(token))
    except grpc.RpcError as exc:
        raise RemoteError(exc.code(), exc.details() or "") from None
