"""`cliplora classify`: the gateway's gRPC client, printing what `predict` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import grpc

from cliplora.errors import CliploraError, InvalidArgument, NotFound, PermissionDenied
from cliplora.predictions import Prediction, result_json, validate_top_k
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_BATCH = 16


class RemoteError(CliploraError):
    """A status the gateway answered with; keeps its code name."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code.name  # type: ignore[misc]


def _read(path: str | Path) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidArgument(f"not an image file but a folder: {path}") from None
    except PermissionError:
        raise PermissionDenied(f"cannot read image file: {path}") from None


def classify_files(
    target: str,
    model: str,
    images: Sequence[str | Path],
    *,
    top_k: int = 5,
    version: int = 0,
    timeout_s: float = 30.0,
    batch: int = DEFAULT_BATCH,
) -> list[dict[str, Any]]:
    """Classify image files through the gateway at `target` (HOST:PORT)."""
    validate_top_k(top_k)
    if not images:
        raise InvalidArgument("no images given")
    payloads = [_read(p) for p in images]
    results: list[dict[str, Any]] = []
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 * 1024 * 1024)]) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        for start in range(0, len(payloads), batch):
            request = pb.ClassifyRequest(model=model, version=version, top_k=top_k,
                                         images=[pb.Image(encoded=data) for data in payloads[start : start + batch]])
            try:
                response = stub.Classify(request, timeout=timeout_s)
            except grpc.RpcError as exc:
                raise RemoteError(exc.code(), exc.details() or "") from None
            for path, result in zip(images[start : start + batch], response.results):
                predictions = [Prediction(p.label, p.index, p.score, p.logit) for p in result.predictions]
                results.append(result_json(str(path), predictions))
    return results
