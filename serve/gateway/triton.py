"""The gateway's view of Triton: one long-lived client, model discovery, inference.

Models, versions, input size, batch limit and labels all come from Triton itself (the
repository index, each model's config, and one classification-extension call per
model version for its labels), so the gateway needs no access to the model files.
Discovery runs at start, every `refresh_interval_s`, and whenever a request names a
model or version the gateway has not seen.

Scale-out: the channel balances calls round-robin over every address Triton's name
resolves to (a Kubernetes headless Service gives one per pod), and with
`renew_s` > 0 it is reopened that often, so the name is resolved again and replicas
added since get their share. A replaced channel is closed only when its last call
has ended: renewing loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from cliplora.core import contract, open_vocab
from cliplora.core.errors import InvalidArgument, NotFound, Unavailable
from cliplora.serve.gateway.errors import from_triton

log = logging.getLogger(__name__)
CONTROL_TIMEOUT_S = 5.0
CHUNKS_IN_FLIGHT = 4  # max_batch_size chunks one call has at Triton at once


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel defaults, plus round-robin over all resolved addresses and
    a short reconnect back-off."""
    keepalive = triton_aio.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", triton_aio.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", triton_aio.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.lb_policy_name", "round_robin"),
        # Reconnect to a restarted Triton within 2 s: gRPC's default back-off grows to 120 s,
        # which would keep health NOT_SERVING long after a supervised restart.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


@dataclass(frozen=True)
class TextEntry:
    """A classifier's text encoder (``<name>_text``) as Triton describes it."""

    name: str
    versions: tuple[int, ...]  # ready versions, ascending
    embedding_dim: int
    max_batch_size: int
    classifier: str  # the model it belongs to, from its config


@dataclass(frozen=True)
class OpenVocabulary:
    """What a classifier exported with ``--open-vocabulary`` says about its text side."""

    text: TextEntry
    logit_scale: float
    templates: tuple[str, ...]
    vocab_sha256: str  # the BPE vocabulary the text encoder's token ids come from

    @property
    def embedding_dim(self) -> int:
        return self.text.embedding_dim  # the image side's, too: a mismatch is no open vocabulary


@dataclass(frozen=True)
class ModelEntry:
    """A servable classifier as Triton describes it."""

    name: str
    versions: tuple[int, ...]  # ready versions, ascending
    image_size: int
    num_classes: int
    max_batch_size: int
    labels: tuple[str, ...]
    open_vocabulary: OpenVocabulary | None = None  # None: no (ready) text encoder
    text_model: str | None = None  # the text encoder the config names, ready or not

    def pinned(self, version: int) -> int:
        """The version for an open-vocabulary call: `version`, or for 0 the newest version
        that the classifier and its text encoder both have ready (they are one export)."""
        if version or self.open_vocabulary is None:
            return self.resolve(version)
        common = sorted(set(self.versions) & set(self.open_vocabulary.text.versions))
        if not common:
            raise Unavailable(f"model {self.name!r} and its text encoder {self.open_vocabulary.text.name!r} have no "
                              f"ready version in common yet ({list(self.versions)} vs "
                              f"{list(self.open_vocabulary.text.versions)})")
        return common[-1]

    def resolve(self, version: int) -> int:
        """The version to run: `version`, or the latest ready one for 0."""
        if version == 0:
            return self.versions[-1]
        if version not in self.versions:
            raise NotFound(f"model {self.name!r} has no ready version {version} (ready: {list(self.versions)})")
        return version


def require_open_vocabulary(entry: ModelEntry) -> OpenVocabulary:
    """The model's open-vocabulary side. FAILED_PRECONDITION naming the flag for a model
    exported without it; UNAVAILABLE for one whose text encoder is not ready (yet)."""
    if entry.open_vocabulary is not None:
        return entry.open_vocabulary
    if entry.text_model:
        raise Unavailable(f"the text encoder {entry.text_model!r} of model {entry.name!r} is not ready in Triton")
    raise open_vocab.not_open_vocabulary(entry.name)


def _text_missing(entry: ModelEntry, version: int) -> bool:
    if entry.open_vocabulary is None:
        return entry.text_model is not None
    return bool(version) and version not in entry.open_vocabulary.text.versions


def _open_vocabulary(name: str, config: dict[str, Any], shape: contract.ClassifierShape,
                     texts: dict[str, TextEntry]) -> OpenVocabulary | None:
    """The classifier's open-vocabulary side, when its config names a ready text encoder
    that names it back; None (with the reason logged) otherwise."""
    text_name = contract.parameter(config, contract.PARAM_TEXT_MODEL)
    if not text_name or shape.embedding_dim is None:
        return None
    text = texts.get(text_name)
    if text is None or text.classifier != name:
        log.warning("model %s names the text encoder %s, which Triton does not serve for it: no open vocabulary",
                    name, text_name)
        return None
    if text.embedding_dim != shape.embedding_dim:
        log.warning("model %s: image embeddings of size %d, text embeddings of size %d: no open vocabulary",
                    name, shape.embedding_dim, text.embedding_dim)
        return None
    try:
        scale = float(contract.parameter(config, contract.PARAM_LOGIT_SCALE) or "nan")
        templates = tuple(json.loads(contract.parameter(config, contract.PARAM_TEMPLATES) or "[]"))
    except (ValueError, TypeError) as exc:
        log.warning("model %s has unreadable open-vocabulary parameters (%s): no open vocabulary", name, exc)
        return None
    if not math.isfinite(scale) or scale <= 0 or not templates or not all(isinstance(t, str) for t in templates):
        log.warning("model %s has no usable logit scale or templates: no open vocabulary", name)
        return None
    return OpenVocabulary(text, scale, templates, contract.parameter(config, contract.PARAM_VOCAB_SHA256) or "")


class Triton:
    """Everything the gateway asks of Triton."""

    def __init__(self, url: str, renew_s: float = 0.0) -> None:
        self.url = url
        self.renew_s = renew_s
        self.client = self._connect()
        self.opened = time.monotonic()
        self._calls: dict[triton_aio.InferenceServerClient, int] = {}
        self._retired: set[triton_aio.InferenceServerClient] = set()
        self._models: dict[str, ModelEntry] = {}
        self._labels: dict[tuple[str, int], tuple[str, ...]] = {}
        self._refresh_lock = asyncio.Lock()
        self.discovery_error: str | None = None  # why the last discovery round failed; None after a good one
        self._background: set[asyncio.Task[object]] = set()
        self.on_refresh: list[Callable[[dict[str, ModelEntry]], None]] = []

    def _connect(self) -> triton_aio.InferenceServerClient:
        return triton_aio.InferenceServerClient(self.url, channel_args=channel_args())

    @asynccontextmanager
    async def _channel(self) -> AsyncIterator[triton_aio.InferenceServerClient]:
        """The current client, counted as in use until the call ends."""
        client = self.client
        self._calls[client] = self._calls.get(client, 0) + 1
        try:
            yield client
        finally:
            self._calls[client] -= 1
            if not self._calls[client]:
                del self._calls[client]
                if client in self._retired:
                    self._retired.discard(client)
                    await client.close()

    async def renew_if_due(self) -> bool:
        """Reopen the channel when it is older than `renew_s` (0: never)."""
        if not self.renew_s or time.monotonic() - self.opened < self.renew_s:
            return False
        old, self.client, self.opened = self.client, self._connect(), time.monotonic()
        if old in self._calls:
            self._retired.add(old)  # closed by its last call
        else:
            await old.close()
        log.info("reopened the Triton channel to %s", self.url)
        return True

    @property
    def models(self) -> dict[str, ModelEntry]:
        return dict(self._models)

    async def ready(self) -> bool:
        try:
            async with self._channel() as client:
                return bool(await client.is_server_ready(client_timeout=CONTROL_TIMEOUT_S))
        except (TimeoutError, InferenceServerException, OSError):
            return False

    async def refresh(self) -> dict[str, ModelEntry]:
        """Re-read the repository index and configs; keeps the old view if Triton is down."""
        async with self._refresh_lock:
            try:
                async with self._channel() as client:
                    index = await client.get_model_repository_index(as_json=True, client_timeout=CONTROL_TIMEOUT_S)
            except InferenceServerException as exc:
                log.warning("model discovery failed: %s", exc.message())
                self.discovery_error = exc.message() or str(exc.status())
                return self.models
            self.discovery_error = None
            ready: dict[str, list[int]] = {}
            for model in index.get("models", []):
                if model.get("state") == "READY" and str(model.get("version", "")).isdigit():
                    ready.setdefault(model["name"], []).append(int(model["version"]))
            configs: dict[str, dict[str, Any]] = {}
            for name in sorted(ready):
                try:
                    async with self._channel() as client:
                        response = await client.get_model_config(name, as_json=True, client_timeout=CONTROL_TIMEOUT_S)
                    configs[name] = response.get("config", response)
                except InferenceServerException as exc:
                    log.warning("skipping model %s: %s", name, exc)
            texts: dict[str, TextEntry] = {}
            for name, config in configs.items():
                if contract.is_text_model(config):
                    try:
                        shape = contract.text_shape(name, config)
                    except ValueError as exc:
                        log.warning("skipping text encoder %s: %s", name, exc)
                        continue
                    texts[name] = TextEntry(name, tuple(sorted(ready[name])), shape.embedding_dim,
                                            shape.max_batch_size,
                                            contract.parameter(config, contract.PARAM_CLASSIFIER) or "")
            found: dict[str, ModelEntry] = {}
            for name, config in configs.items():
                if name in texts:
                    continue
                try:
                    found[name] = await self._describe(name, sorted(ready[name]), config, texts)
                except (InferenceServerException, ValueError) as exc:
                    log.warning("skipping model %s: %s", name, exc)
            if set(found) != set(self._models):
                log.info("models now served: %s", ", ".join(f"{n} {list(e.versions)}" for n, e in found.items()) or "none")
            self._models = found
            for callback in self.on_refresh:
                callback(self.models)
            return self.models

    async def _describe(self, name: str, versions: list[int], config: dict[str, Any],
                        texts: dict[str, TextEntry]) -> ModelEntry:
        shape = contract.classifier_shape(name, config)
        labels = await self._labels_of(name, versions[-1], shape.image_size, shape.num_classes)
        return ModelEntry(name, tuple(versions), shape.image_size, shape.num_classes, shape.max_batch_size, labels,
                          _open_vocabulary(name, config, shape, texts),
                          contract.parameter(config, contract.PARAM_TEXT_MODEL) or None)

    async def _labels_of(self, name: str, version: int, size: int, classes: int) -> tuple[str, ...]:
        """Labels via Triton's classification extension (``"value:index:label"`` strings)."""
        key = (name, version)
        if key not in self._labels:
            image = triton_aio.InferInput(contract.INPUT_NAME, [1, size, size, contract.CHANNELS], contract.INPUT_WIRE_DTYPE)
            image.set_data_from_numpy(np.zeros((1, size, size, contract.CHANNELS), dtype=np.uint8))
            output = triton_aio.InferRequestedOutput(contract.OUTPUT_NAME, class_count=classes)
            async with self._channel() as client:
                result = await client.infer(name, [image], model_version=str(version), outputs=[output],
                                            client_timeout=60.0)
            labels: list[str | None] = [None] * classes
            for entry in result.as_numpy(contract.OUTPUT_NAME).reshape(-1):
                text = entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)
                _value, index, label = text.split(":", 2)
                labels[int(index)] = label
            if any(label is None for label in labels):
                raise ValueError(f"model {name} has no labels.txt (classification extension gave no labels)")
            self._labels[key] = tuple(labels)  # type: ignore[arg-type]
        return self._labels[key]

    async def lookup(self, name: str, version: int, *, text: bool = False) -> tuple[ModelEntry, int]:
        """The model entry and concrete version for a request, refreshing once if unknown;
        with `text` (request-time labels, Embed) also when the model's text encoder, or its
        version, was not ready at the last look (the two models load one after the other)."""
        entry = self._models.get(name)
        if entry is None or (version and version not in entry.versions) or (text and _text_missing(entry, version)):
            await self.refresh()
            entry = self._models.get(name)
        if entry is None:
            if self.discovery_error is not None:  # Triton did not answer: nobody knows whether it exists
                raise Unavailable(f"Triton is unavailable, so model {name!r} cannot be looked up: {self.discovery_error}")
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {name!r} not found (models: {known})")
        if version and version not in entry.versions and self.discovery_error is not None:
            raise Unavailable(f"Triton is unavailable, so version {version} of {name!r} cannot be looked up: "
                              f"{self.discovery_error}")
        return entry, entry.resolve(version)

    async def infer(
        self, entry: ModelEntry, version: int, batch: np.ndarray, timeout_s: float,
        output: str = contract.OUTPUT_NAME,
    ) -> tuple[np.ndarray, int]:
        """(`output` [N, C] logits or [N, D] image_embeds, the version that answered) for a
        uint8 batch [N, S, S, 3], split to the model's batch limit. Triton sends only the
        output asked for.

        Version 0 asks for the latest version of whichever Triton replica takes the call,
        not the latest the gateway last saw: during a rolling upgrade replicas may differ,
        and naming a version one of them lacks would fail the call.
        """
        width = entry.num_classes if output == contract.OUTPUT_NAME else self._embedding_dim(entry)
        results = await self._chunked(entry.name, version, batch, entry.max_batch_size, timeout_s,
                                      contract.INPUT_NAME, contract.INPUT_WIRE_DTYPE, output, width,
                                      lambda: entry.resolve(version))
        return results

    async def embed_texts(
        self, entry: ModelEntry, version: int, tokens: np.ndarray, timeout_s: float
    ) -> np.ndarray:
        """[N, D] unit text embeddings from the classifier's text encoder, `version` pinned
        (the classifier's own version: the two are published together)."""
        text = self._text_of(entry)
        if version not in text.versions:
            raise NotFound(f"text encoder {text.name!r} has no ready version {version} (ready: {list(text.versions)})")
        embeddings, _ = await self._chunked(text.name, version, tokens, text.max_batch_size, timeout_s,
                                            contract.TEXT_INPUT_NAME, contract.TEXT_INPUT_WIRE_DTYPE,
                                            contract.TEXT_OUTPUT_NAME, text.embedding_dim, lambda: version)
        return embeddings

    @staticmethod
    def _text_of(entry: ModelEntry) -> TextEntry:
        return require_open_vocabulary(entry).text

    def _embedding_dim(self, entry: ModelEntry) -> int:
        return require_open_vocabulary(entry).embedding_dim

    async def _chunked(self, model: str, version: int, batch: np.ndarray, max_batch: int, timeout_s: float,
                       input_name: str, wire_dtype: str, output: str, width: int,
                       fallback_version: Callable[[], int]) -> tuple[np.ndarray, int]:
        limit = max_batch or len(batch)
        chunks = [batch[i : i + limit] for i in range(0, len(batch), limit)]
        in_flight = asyncio.Semaphore(CHUNKS_IN_FLIGHT)  # one call's share of Triton, however many prompts

        async def one(chunk: np.ndarray) -> tuple[np.ndarray, int]:
            async with in_flight:
                return await self._infer_chunk(model, version, chunk, timeout_s, input_name, wire_dtype, output, width,
                                               fallback_version)

        results = await asyncio.gather(*(one(chunk) for chunk in chunks))
        return np.concatenate([values for values, _ in results]), max(answered for _, answered in results)

    async def _infer_chunk(
        self, model: str, version: int, chunk: np.ndarray, timeout_s: float, input_name: str, wire_dtype: str,
        output_name: str, width: int, fallback_version: Callable[[], int],
    ) -> tuple[np.ndarray, int]:
        tensor = triton_aio.InferInput(input_name, list(chunk.shape), wire_dtype)
        tensor.set_data_from_numpy(chunk)
        output = triton_aio.InferRequestedOutput(output_name)
        try:
            async with self._channel() as client:
                result = await client.infer(
                    model, [tensor], model_version=str(version) if version else "", outputs=[output],
                    client_timeout=timeout_s, timeout=max(1, int(timeout_s * 1e6)),
                )
        except InferenceServerException as exc:
            error = from_triton(exc, model)
            if isinstance(error, NotFound):  # the model went away: re-read the repository soon
                task = asyncio.get_running_loop().create_task(self.refresh())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            if error is None:
                raise
            raise error from None
        except (TimeoutError, OSError) as exc:
            raise Unavailable(f"Triton is unavailable: {exc}") from None
        values = result.as_numpy(output_name)
        if values is None or values.shape != (len(chunk), width):
            shape = None if values is None else values.shape
            raise RuntimeError(f"Triton returned {output_name} of shape {shape} for {len(chunk)} inputs of {model}")
        answered = result.get_response().model_version
        return values, int(answered) if answered.isdigit() else fallback_version()

    async def close(self) -> None:
        for client in (self.client, *self._retired):
            await client.close()
        self._retired.clear()


def check_raw_size(width: int, height: int, entry: ModelEntry) -> None:
    if width != entry.image_size or height != entry.image_size:
        raise InvalidArgument(
            f"raw images must be {entry.image_size}x{entry.image_size} for {entry.name}, got {width}x{height}"
        )
