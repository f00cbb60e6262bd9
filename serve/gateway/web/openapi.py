"""The HTTP door's OpenAPI 3.1 document (``GET /openapi.json``), written out by hand: the
door has eight routes, and the test suite checks the document and the router name the same
ones (tests/test_http_door.py)."""

from __future__ import annotations

from functools import cache
from typing import Any

from cliplora import __version__

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "string", "description": "the gRPC status name, e.g. INVALID_ARGUMENT"},
                   "message": {"type": "string"}}}}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_CLASSIFY = {"type": "object", "required": ["model", "images"], "additionalProperties": False, "properties": {
    "model": {"type": "string"},
    "version": {"type": "integer", "minimum": 0, "description": "0 or absent: the latest ready version"},
    "adapter": {"type": "string", "description": "banks: the adapter to classify with; absent: the base"},
    "images": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["b64"], "additionalProperties": False,
        "properties": {"b64": {"type": "string", "contentEncoding": "base64",
                               "description": "the image file (JPEG, PNG, WebP, BMP, GIF)"}}}},
    "labels": {**_STRINGS, "description": "open vocabulary: rank these labels instead of the model's classes"},
    "templates": {**_STRINGS, "description": 'prompt templates, each with one "{}"; absent: the model\'s own'},
    "top_k": {"type": "integer", "minimum": 0, "description": "predictions per image; absent: 5; 0: all"}}}
_CLASSIFY_FORM = {"type": "object", "required": ["model", "image"], "properties": {
    "model": {"type": "string"}, "version": {"type": "integer"}, "adapter": {"type": "string"},
    "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "labels": _STRINGS, "templates": _STRINGS, "top_k": {"type": "integer"}}}
_PREDICTION = {"type": "object", "properties": {
    "label": {"type": "string"}, "index": {"type": "integer"},
    "score": {"type": "number", "description": "softmax over all classes"},
    "logit": {"type": "number", "description": "logit scale x cosine similarity"}}}
_CLASSIFIED = {"type": "array", "items": {"type": "object", "properties": {
    "image": {"type": "string", "description": 'the file part\'s name, or "images[i]"'},
    "predictions": {"type": "array", "items": _PREDICTION}}}}
_EMBEDDINGS = {"type": "object", "required": ["model", "input"], "additionalProperties": False, "properties": {
    "model": {"type": "string"}, "version": {"type": "integer", "minimum": 0}, "adapter": {"type": "string"},
    "input": {"oneOf": [{"type": "string"}, {**_STRINGS, "minItems": 1}],
              "description": "texts, and images as data:image/<type>;base64,<data> URLs"},
    "encoding_format": {"enum": ["float", "base64"], "description": "base64: little-endian float32"},
    "dimensions": {"type": "integer", "description": "must equal the model's embedding size"},
    "user": {"type": "string", "description": "accepted and ignored"}}}
_EMBEDDED = {"type": "object", "properties": {
    "object": {"const": "list"}, "model": {"type": "string"},
    "data": {"type": "array", "items": {"type": "object", "properties": {
        "object": {"const": "embedding"}, "index": {"type": "integer"},
        "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}},
    "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                               "total_tokens": {"type": "integer"}}}}}
_MODELS = {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
    "type": "object", "description": "OpenAI's model object plus every field of cliplora.v1.ModelInfo",
    "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "kind": {"enum": ["classifier", "bank"]},
                   "versions": {"type": "array", "items": {"type": "integer"}},
                   "open_vocabulary": {"type": "boolean"}, "adapters": {"type": "array"}}}}}}
_ERRORS = {str(status): {"description": meaning, "content": {"application/json": {"schema": _ERROR}}}
           for status, meaning in ((400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED"),
                                   (404, "NOT_FOUND"), (409, "FAILED_PRECONDITION"),
                                   (413, "the body is over the limit (RESOURCE_EXHAUSTED)"),
                                   (429, "RESOURCE_EXHAUSTED: over the concurrency limit"),
                                   (503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED"))}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _post(summary: str, body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": body},
                     "responses": {"200": answer, **_ERRORS}}}


def _get(summary: str, answer: dict[str, Any], *, errors: bool = True) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": answer, **(_ERRORS if errors else {})}}}


@cache
def document() -> dict[str, Any]:
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "cliplora gateway (HTTP door)", "version": __version__,
                 "description": "The gRPC service cliplora.v1.Classifier over HTTP/JSON; errors carry the gRPC "
                                "status name. Header Request-Timeout: seconds (the deadline)."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
        "paths": {
            "/v1/classify": _post("Classify images with a model (or a bank's adapter)",
                                  {"application/json": {"schema": _CLASSIFY},
                                   "multipart/form-data": {"schema": _CLASSIFY_FORM}}, _json(_CLASSIFIED)),
            "/v1/embeddings": _post("OpenAI-compatible embeddings of texts and images",
                                    {"application/json": {"schema": _EMBEDDINGS}}, _json(_EMBEDDED)),
            "/v1/models": _get("The models served, OpenAI's list shape", _json(_MODELS)),
            "/healthz": _get("The gateway process is up", _json(status), errors=False),
            "/readyz": _get("Triton is ready (503 otherwise)", _json(status)),
            "/openapi.json": _get("This document", _json({"type": "object"}), errors=False),
            "/": _get("The playground page", {"description": "HTML", "content": {"text/html": {}}}, errors=False),
            "/static/{name}": _get("The playground's script and style sheet", {"description": "a file"},
                                   errors=False),
        },
    }
