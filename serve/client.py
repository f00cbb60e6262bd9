"""`cliplora classify`: the gateway's gRPC client, printing what `predict` prints."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from cliplora.errors import CliploraError, InvalidArgument
from cliplora.predictions import Prediction, result_json, validate_top_k
from cliplora.preprocess import read_image_bytes
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc
from serve.security import client_channel

DEFAULT_BATCH = 16
TOKEN_ENV = "CLIPLORA_TOKEN"


class RemoteError(CliploraError):
    """A status the gateway answered with; keeps its code name."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code.name  # type: ignore[misc]


def token_metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    """``authorization`` metadata from `token` or ``CLIPLORA_TOKEN``; empty without either."""
    token = token or os.environ.get(TOKEN_ENV, "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def classify_files(
    target: str,
    model: str,
    images: Sequence[str | Path],
    *,
    top_k: int = 5,
    version: int = 0,
    timeout_s: float = 30.0,
    batch: int = DEFAULT_BATCH,
    token: str | None = None,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> list[dict[str, Any]]:
    """Classify image files through the gateway at `target` (HOST:PORT).

    The bearer token comes from `token` or ``CLIPLORA_TOKEN``; `tls_ca` switches to TLS
    (with `tls_cert`/`tls_key` for mutual TLS).
    """
    validate_top_k(top_k)
    if not images:
        raise InvalidArgument("no images given")
    payloads = [read_image_bytes(p) for p in images]
    results: list[dict[str, Any]] = []
    metadata = token_metadata(token)
    options = [("grpc.max_send_message_length", 256 * 1024 * 1024)]
    with client_channel(target, ca=tls_ca, cert=tls_cert, key=tls_key, options=options) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for start in range(0, len(payloads), batch):
            request = pb.ClassifyRequest(model=model, version=version, top_k=top_k,
                                         images=[pb.Image(encoded=data) for data in payloads[start : start + batch]])
            try:
                response = stub.Classify(request, timeout=timeout_s, metadata=metadata)
            except grpc.RpcError as exc:
                raise RemoteError(exc.code(), exc.details() or "") from None
            for path, result in zip(images[start : start + batch], response.results, strict=True):
                predictions = [Prediction(p.label, p.index, p.score, p.logit) for p in result.predictions]
                results.append(result_json(str(path), predictions))
    return results
