"""The checks a request passes before any model is looked up, and what they leave.

Cheap things first, so that a bad request costs nothing: the model name, the version,
the image count and sizes, ``top_k``, and the request's labels, templates or texts
against the gateway's limits. What passes is a typed query the handlers work from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cliplora.core.errors import InvalidArgument
from cliplora.core.open_vocab import RequestVocabulary, validate_texts
from cliplora.core.predictions import validate_top_k
from cliplora.core.repository import validate_adapter_id, validate_model_name
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.v1 import classifier_pb2 as pb

DEFAULT_TOP_K = 5

@dataclass(frozen=True)
class ClassifyQuery:
    model: str
    version: int  # 0: latest
    images: Sequence[pb.Image]
    top_k: int
    vocabulary: RequestVocabulary | None  # request-time labels; None: the model's classes
    adapter: str  # a bank's adapter; empty: its base (or not a bank)

    @classmethod
    def parse(cls, request: pb.ClassifyRequest, settings: GatewaySettings) -> ClassifyQuery:
        check_images(request.model, request.version, request.images, 1, settings)
        top_k = validate_top_k(request.top_k if request.HasField("top_k") else DEFAULT_TOP_K)
        vocabulary = RequestVocabulary.parse(request.labels, request.templates, settings.vocabulary_limits)
        return cls(request.model, request.version, request.images, top_k, vocabulary, check_adapter(request.adapter))

@dataclass(frozen=True)
class EmbedQuery:
    model: str
    version: int
    images: Sequence[pb.Image]
    texts: list[str]
    adapter: str

    @classmethod
    def parse(cls, request: pb.EmbedRequest, settings: GatewaySettings) -> EmbedQuery:
        check_images(request.model, request.version, request.images, 0, settings)
        if not request.images and not request.texts:
            raise InvalidArgument("nothing to embed: send images, texts or both")
        texts = validate_texts(request.texts, settings.vocabulary_limits)
        return cls(request.model, request.version, request.images, texts, check_adapter(request.adapter))


def check_adapter(adapter: str) -> str:
    """A bank adapter's id as given (empty: none named), or InvalidArgument."""
    return validate_adapter_id(adapter) if adapter else ""

def check_images(model: str, version: int, images: Sequence[pb.Image], min_images: int,
                 settings: GatewaySettings) -> None:
    """The checks that need no model: name, version, image count and sizes."""
    validate_model_name(model)
    if version < 0:
        raise InvalidArgument(f"version must be 0 (latest) or a version number, got {version}")
    count = len(images)
    if not min_images <= count <= settings.max_images:
        raise InvalidArgument(f"send {min_images} to {settings.max_images} images per request, got {count}")
    for i, image in enumerate(images):
        kind = image.WhichOneof("data")
        if kind is None:
            raise InvalidArgument(f"image {i} is empty: set encoded or raw")
        size = len(image.encoded) if kind == "encoded" else len(image.raw.rgb)
        if size > settings.max_image_bytes:
            raise InvalidArgument(f"image {i} has {size} bytes; the limit is {settings.max_image_bytes}")
