"""The gateway's Triton (`TritonBackend`): one long-lived client, model discovery, inference.

Models, versions, input size, batch limit and class names all come from Triton itself
(the repository index, each model's config, and one classification-extension call per
model version for its labels.txt), so the gateway needs no access to the model files.
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
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from cliplora.core import contract
from cliplora.core.errors import NotFound, Unavailable
from cliplora.serve.gateway.errors import from_triton
from cliplora.serve.gateway.models import ModelEntry, Route, TextEntry, describe_open_vocabulary

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


class Triton:
    """Everything the gateway asks of Triton (`cliplora.serve.gateway.backend.TritonBackend`)."""

    def __init__(self, url: str, renew_s: float = 0.0) -> None:
        self.url = url
        self.renew_s = renew_s
        self.client = self._connect()
        self.opened = time.monotonic()
        self._calls: dict[triton_aio.InferenceServerClient, int] = {}
        self._retired: set[triton_aio.InferenceServerClient] = set()
        self._models: dict[str, ModelEntry] = {}
        self._class_names: dict[tuple[str, int], tuple[str, ...]] = {}
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
        names = await self._class_names_of(name, versions[-1], shape.image_size, shape.num_classes)
        return ModelEntry(name, tuple(versions), shape.image_size, shape.num_classes, shape.max_batch_size, names,
                          describe_open_vocabulary(name, config, shape, texts),
                          contract.parameter(config, contract.PARAM_TEXT_MODEL) or None)

    async def _class_names_of(self, name: str, version: int, size: int, classes: int) -> tuple[str, ...]:
        """Class names via Triton's classification extension (``"value:index:label"`` strings
        from the model's labels.txt)."""
        key = (name, version)
        if key not in self._class_names:
            image = triton_aio.InferInput(contract.INPUT_NAME, [1, size, size, contract.CHANNELS], contract.INPUT_WIRE_DTYPE)
            image.set_data_from_numpy(np.zeros((1, size, size, contract.CHANNELS), dtype=np.uint8))
            output = triton_aio.InferRequestedOutput(contract.OUTPUT_NAME, class_count=classes)
            async with self._channel() as client:
                result = await client.infer(name, [image], model_version=str(version), outputs=[output],
                                            client_timeout=60.0)
            names: list[str | None] = [None] * classes
            for entry in result.as_numpy(contract.OUTPUT_NAME).reshape(-1):
                text = entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)
                _value, index, label = text.split(":", 2)
                names[int(index)] = label
            if any(n is None for n in names):
                raise ValueError(f"model {name} has no labels.txt (classification extension gave no labels)")
            self._class_names[key] = tuple(names)  # type: ignore[arg-type]
        return self._class_names[key]

    async def lookup(self, name: str, version: int, *, text: bool = False) -> Route:
        """The route of a request: its model entry and version, and with `text` (request-time
        labels, Embed) its text side. Refreshes once if the model or version is unknown, or
        with `text` when the text encoder, or its version, was not ready at the last look
        (the two models load one after the other)."""
        entry = self._models.get(name)
        if entry is None or (version and version not in entry.versions) or (text and entry.text_missing(version)):
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
        return entry.route(version, text=text)

    async def infer_images(self, route: Route, batch: np.ndarray, timeout_s: float,
                           output: str = contract.OUTPUT_NAME) -> tuple[np.ndarray, int]:
        """(`output` [N, C] logits or [N, D] image_embeds, the version that answered) for a
        uint8 batch [N, S, S, 3], split to the model's batch limit. Triton sends only the
        output asked for. The version asked for is `route.triton_version`."""
        entry = route.entry
        if output == contract.OUTPUT_NAME:
            width = entry.num_classes
        elif route.vocabulary is not None:
            width = route.vocabulary.embedding_dim
        else:
            raise ValueError(f"{output} of {entry.name} asked for without its text side")
        return await self._chunked(entry.name, route.triton_version, batch, entry.max_batch_size, timeout_s,
                                   contract.INPUT_NAME, contract.INPUT_WIRE_DTYPE, output, width, route.version)

    async def embed_texts(self, route: Route, tokens: np.ndarray, timeout_s: float) -> np.ndarray:
        """[N, D] unit text embeddings from the route's text encoder, at the route's version
        (the classifier's own: the two are published together)."""
        if route.vocabulary is None:
            raise ValueError(f"texts of {route.entry.name} asked for without its text side")
        text = route.vocabulary.text
        route.check_version(route.version)
        embeddings, _ = await self._chunked(text.name, route.version, tokens, text.max_batch_size, timeout_s,
                                            contract.TEXT_INPUT_NAME, contract.TEXT_INPUT_WIRE_DTYPE,
                                            contract.TEXT_OUTPUT_NAME, text.embedding_dim, route.version)
        return embeddings

    async def _chunked(self, model: str, version: int, batch: np.ndarray, max_batch: int, timeout_s: float,
                       input_name: str, wire_dtype: str, output: str, width: int,
                       expected_version: int) -> tuple[np.ndarray, int]:
        """One call's inputs in chunks of the model's batch limit, at most CHUNKS_IN_FLIGHT at
        Triton at once; (outputs in order, the newest version that answered)."""
        limit = max_batch or len(batch)
        chunks = [batch[i : i + limit] for i in range(0, len(batch), limit)]
        in_flight = asyncio.Semaphore(CHUNKS_IN_FLIGHT)  # one call's share of Triton, however many prompts

        async def one(chunk: np.ndarray) -> tuple[np.ndarray, int]:
            async with in_flight:
                return await self._infer_chunk(model, version, chunk, timeout_s, input_name, wire_dtype, output, width,
                                               expected_version)

        results = await asyncio.gather(*(one(chunk) for chunk in chunks))
        return np.concatenate([values for values, _ in results]), max(answered for _, answered in results)

    async def _infer_chunk(
        self, model: str, version: int, chunk: np.ndarray, timeout_s: float, input_name: str, wire_dtype: str,
        output_name: str, width: int, expected_version: int,
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
        return values, int(answered) if answered.isdigit() else expected_version

    async def close(self) -> None:
        for client in (self.client, *self._retired):
            await client.close()
        self._retired.clear()

