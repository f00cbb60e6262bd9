"""HTTP bodies to the gRPC messages the service takes, and its answers back to JSON.

Strict on the way in: a field of the wrong type, an unknown field (a typo would otherwise
be ignored unseen) or bad base64 is InvalidArgument naming it. What the message allows
is then checked where gRPC's is (`cliplora.serve.gateway.requests`), so both doors refuse
the same things with the same words.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import Message
from multidict import MultiDict

from cliplora.core.errors import InvalidArgument
from cliplora.core.predictions import Prediction, result_json
from cliplora.serve.gateway.web.bodies import Upload
from cliplora.v1 import classifier_pb2 as pb

IMAGE_DATA_PREFIX = "data:image/"  # an OpenAI input string that is an image (a data URL)
CLASSIFY_FIELDS = {"model", "version", "adapter", "images", "labels", "templates", "top_k"}
EMBEDDING_FIELDS = {"model", "version", "adapter", "input", "encoding_format", "dimensions", "user"}
ENCODINGS = ("float", "base64")


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or InvalidArgument saying what it is instead."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"the request body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"the request body must be a JSON object, got {type(value).__name__}")
    return value


@dataclass
class ClassifyCall:
    """A classify request and the name each image goes by in the answer."""

    request: pb.ClassifyRequest
    names: list[str] = field(default_factory=list)


def classify_from_json(body: bytes) -> ClassifyCall:
    """``{"model", "version"?, "adapter"?, "images": [{"b64"}], "labels"?, "templates"?, "top_k"?}``."""
    obj = json_object(body)
    _only(obj, CLASSIFY_FIELDS, "a classify request")
    images = obj.get("images")
    if not isinstance(images, list):
        raise InvalidArgument('"images" must be a list of {"b64": "<base64 of the image file>"}')
    request = pb.ClassifyRequest(model=_text(obj, "model", required=True), version=_version(obj),
                                 adapter=_text(obj, "adapter"), labels=_texts(obj, "labels"),
                                 templates=_texts(obj, "templates"),
                                 images=[pb.Image(encoded=_b64_image(i, image)) for i, image in enumerate(images)])
    if obj.get("top_k") is not None:
        request.top_k = _integer(obj["top_k"], "top_k", bits=32)
    return ClassifyCall(request, [f"images[{i}]" for i in range(len(images))])


def classify_from_form(form: MultiDict[str | Upload]) -> ClassifyCall:
    """multipart/form-data: files in the repeated field ``image``, the rest as form fields
    (``labels`` and ``templates`` repeated, one value each)."""
    _only(form, CLASSIFY_FIELDS - {"images"} | {"image"}, "a classify form")
    files = form.getall("image", [])
    images, names = [], []
    for i, part in enumerate(files):
        if not isinstance(part, Upload):
            raise InvalidArgument(f"form field image #{i} is text: send each image as a file part")
        images.append(pb.Image(encoded=part.data))
        names.append(part.filename or f"image[{i}]")
    request = pb.ClassifyRequest(model=_form_value(form, "model", required=True),
                                 version=_integer(_form_value(form, "version") or "0", "version"),
                                 adapter=_form_value(form, "adapter"), images=images,
                                 labels=_form_texts(form, "labels"), templates=_form_texts(form, "templates"))
    if _form_value(form, "top_k"):
        request.top_k = _integer(_form_value(form, "top_k"), "top_k", bits=32)
    return ClassifyCall(request, names)


def classify_answer(response: pb.ClassifyResponse, names: Sequence[str]) -> list[dict[str, Any]]:
    """What `cliplora classify` prints: one ``{"image", "predictions"}`` per image, in order."""
    return [result_json(name, [Prediction(p.label, p.index, p.score, p.logit) for p in result.predictions])
            for name, result in zip(names, response.results, strict=True)]


@dataclass
class EmbeddingsCall:
    """An Embed request built from OpenAI inputs, and where each input's answer is."""

    request: pb.EmbedRequest
    order: list[tuple[str, int]]  # per input: ("image" | "text", its index among its kind)
    encoding: str
    dimensions: int | None


def embeddings_from_json(body: bytes) -> EmbeddingsCall:
    """OpenAI's ``{"model", "input": str | [str], "encoding_format"?, "dimensions"?, "user"?}``,
    plus ``adapter`` and ``version``: a string beginning ``data:image/`` is an image."""
    obj = json_object(body)
    _only(obj, EMBEDDING_FIELDS, "an embeddings request")
    inputs = obj.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) for item in inputs):
        raise InvalidArgument('"input" must be a string or a non-empty list of strings (token arrays are not '
                              'supported: send the text)')
    encoding = obj.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise InvalidArgument(f'"encoding_format" must be one of {", ".join(ENCODINGS)}, got {encoding!r}')
    dimensions = None if obj.get("dimensions") is None else _integer(obj["dimensions"], "dimensions")
    request = pb.EmbedRequest(model=_text(obj, "model", required=True), version=_version(obj),
                              adapter=_text(obj, "adapter"))
    order: list[tuple[str, int]] = []
    for i, item in enumerate(inputs):
        if item.startswith(IMAGE_DATA_PREFIX):
            order.append(("image", len(request.images)))
            request.images.append(pb.Image(encoded=_data_url(i, item)))
        else:
            order.append(("text", len(request.texts)))
            request.texts.append(item)
    return EmbeddingsCall(request, order, encoding, dimensions)


def embeddings_answer(call: EmbeddingsCall, response: pb.EmbedResponse, prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's list of embeddings, in input order."""
    rows = {"image": response.images, "text": response.texts}
    data = []
    for index, (kind, at) in enumerate(call.order):
        values = np.asarray(rows[kind][at].values, dtype="<f4")
        if call.dimensions is not None and call.dimensions != values.shape[0]:
            raise InvalidArgument(f"{response.model} embeds in {values.shape[0]} dimensions; "
                                  f'"dimensions" {call.dimensions} cannot be served (leave it out)')
        embedding = base64.b64encode(values.tobytes()).decode() if call.encoding == "base64" else values.tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": response.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def message_json(message: Message) -> dict[str, Any]:
    """Every field of a message by its proto name, defaults included, 64-bit integers as
    JSON numbers (protobuf's own JSON writes them as strings)."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None:
            out[fd.name] = [message_json(v) for v in value] if fd.is_repeated else message_json(value)
        else:
            out[fd.name] = list(value) if fd.is_repeated else value
    return out


def _only(fields: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise InvalidArgument(f"unknown field(s) in {what}: {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(allowed))})")


def _text(obj: Mapping[str, Any], name: str, *, required: bool = False) -> str:
    value = obj.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f'"{name}" must be a string' + (" (it is required)" if value is None else ""))
    return value


def _texts(obj: Mapping[str, Any], name: str) -> list[str]:
    value = obj.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidArgument(f'"{name}" must be a list of strings')
    return value


def _integer(value: Any, name: str, bits: int = 64) -> int:
    """A JSON integer (or a form field's digits) that fits the message's `bits`-bit field."""
    number: int | None = None
    if isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number is None:
        raise InvalidArgument(f'"{name}" must be an integer, got {value!r}')
    if not -(1 << (bits - 1)) <= number < 1 << (bits - 1):
        raise InvalidArgument(f'"{name}" is out of range: {number}')
    return number


def _version(obj: Mapping[str, Any]) -> int:
    return 0 if obj.get("version") is None else _integer(obj["version"], "version")


def _b64_image(index: int, image: Any) -> bytes:
    if not isinstance(image, dict) or set(image) != {"b64"} or not isinstance(image["b64"], str):
        raise InvalidArgument(f'images[{index}] must be {{"b64": "<base64 of the image file>"}}')
    return _b64decode(image["b64"], f"images[{index}].b64")


def _data_url(index: int, item: str) -> bytes:
    """The bytes of ``data:image/<type>;base64,<data>``."""
    head, comma, data = item.partition(",")
    if not comma or not head.endswith(";base64"):
        raise InvalidArgument(f"input[{index}] is a data URL without base64 data: write data:image/<type>;base64,...")
    return _b64decode(data, f"input[{index}]")


def _b64decode(text: str, where: str) -> bytes:
    """Strict base64 but for line breaks (what `base64` writes without -w0)."""
    try:
        return base64.b64decode(text.replace("\n", "").replace("\r", ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"{where} is not valid base64: {exc}") from None


def _form_value(form: MultiDict[str | Upload], name: str, *, required: bool = False) -> str:
    values = form.getall(name, [])
    if len(values) > 1:
        raise InvalidArgument(f"form field {name} is given {len(values)} times; once at most")
    if not values:
        if required:
            raise InvalidArgument(f"form field {name} is required")
        return ""
    if not isinstance(values[0], str):
        raise InvalidArgument(f"form field {name} must be text, not a file")
    return values[0]


def _form_texts(form: MultiDict[str | Upload], name: str) -> list[str]:
    values = form.getall(name, [])
    if not all(isinstance(value, str) for value in values):
        raise InvalidArgument(f"form field {name} must be text, not a file")
    return list(values)
