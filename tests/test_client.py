"""The gateway client (`cliplora.core.client`) on a stand-in stub: what it sends."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from cliplora.core import client
from cliplora.v1 import classifier_pb2 as pb


class RecordingStub:
    """Answers as version 3 of the model (the latest when a call asks for version 0) and
    keeps every request."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def Classify(self, request: pb.ClassifyRequest, **_: object) -> pb.ClassifyResponse:  # noqa: N802 - gRPC's name
        self.requests.append(request)
        results = [pb.Classification(predictions=[pb.Prediction(label="cat", index=0, score=1.0, logit=1.0)])
                   for _ in request.images]
        return pb.ClassifyResponse(model=request.model, version=request.version or 3, results=results)

    def Embed(self, request: pb.EmbedRequest, **_: object) -> pb.EmbedResponse:  # noqa: N802
        self.requests.append(request)
        vector = pb.Embedding(values=[1.0, 0.0])
        return pb.EmbedResponse(model=request.model, version=request.version or 3,
                                images=[vector] * len(request.images), texts=[vector] * len(request.texts))


@pytest.fixture()
def stub(monkeypatch) -> RecordingStub:
    recording = RecordingStub()

    @contextmanager
    def fake_stub(*args: object):
        yield recording

    monkeypatch.setattr(client, "_stub", fake_stub)
    return recording


@pytest.fixture()
def image_files(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"{i}.png" for i in range(5)]
    for path in paths:
        path.write_bytes(b"not decoded by the client")
    return paths


def test_classify_pins_every_batch_to_the_version_that_answered_the_first(stub, image_files) -> None:
    results = client.classify_files("127.0.0.1:1", "m", image_files, batch=2)
    assert len(results) == 5 and [len(r.images) for r in stub.requests] == [2, 2, 1]
    assert [r.version for r in stub.requests] == [0, 3, 3]


def test_embed_pins_images_and_texts_to_one_version(stub, image_files) -> None:
    results = client.embed_files("127.0.0.1:1", "m", image_files[:3], ["a", "b"], batch=2)
    assert [r.get("image", r.get("text")) for r in results] == [*map(str, image_files[:3]), "a", "b"]
    assert [r.version for r in stub.requests] == [0, 3, 3]


def test_an_asked_version_is_kept(stub, image_files) -> None:
    client.classify_files("127.0.0.1:1", "m", image_files, batch=2, version=2)
    assert [r.version for r in stub.requests] == [2, 2, 2]
