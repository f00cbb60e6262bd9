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
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from cliplora.core import contract
from cliplora.core.errors import InvalidArgument, NotFound, Unavailable
from cliplora.serve.errors import from_triton

log = logging.getLogger(__name__)
CONTROL_TIMEOUT_S = 5.0


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel defaults, plus round-robin over all resolved addresses."""
    keepalive = triton_aio.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", triton_aio.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", triton_aio.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.lb_policy_name", "round_robin"),
    ]


@dataclass(frozen=True)
class ModelEntry:
    """A servable model as Triton describes it."""

    name: str
    versions: tuple[int, ...]  # ready versions, ascending
    image_size: int
    num_classes: int
    max_batch_size: int
    labels: tuple[str, ...]

    def resolve(self, version: int) -> int:
        """The version to run: `version`, or the latest ready one for 0."""
        if version == 0:
            return self.versions[-1]
        if version not in self.versions:
            raise NotFound(f"model {self.name!r} has no ready version {version} (ready: {list(self.versions)})")
        return version


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
            found: dict[str, ModelEntry] = {}
            for name, versions in sorted(ready.items()):
                try:
                    found[name] = await self._describe(name, sorted(versions))
                except (InferenceServerException, ValueError) as exc:
                    log.warning("skipping model %s: %s", name, exc)
            if set(found) != set(self._models):
                log.info("models now served: %s", ", ".join(f"{n} {list(e.versions)}" for n, e in found.items()) or "none")
            self._models = found
            for callback in self.on_refresh:
                callback(self.models)
            return self.models

    async def _describe(self, name: str, versions: list[int]) -> ModelEntry:
        async with self._channel() as client:
            response = await client.get_model_config(name, as_json=True, client_timeout=CONTROL_TIMEOUT_S)
        config = response.get("config", response)
        size, classes, max_batch = contract.model_shape(name, config)
        labels = await self._labels_of(name, versions[-1], size, classes)
        return ModelEntry(name, tuple(versions), size, classes, max_batch, labels)

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

    async def lookup(self, name: str, version: int) -> tuple[ModelEntry, int]:
        """The model entry and concrete version for a request, refreshing once if unknown."""
        entry = self._models.get(name)
        if entry is None or (version and version not in entry.versions):
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
        self, entry: ModelEntry, version: int, batch: np.ndarray, timeout_s: float
    ) -> tuple[np.ndarray, int]:
        """(logits [N, C], the version that answered) for a uint8 batch [N, S, S, 3], split
        to the model's batch limit.

        Version 0 asks for the latest version of whichever Triton replica takes the call,
        not the latest the gateway last saw: during a rolling upgrade replicas may differ,
        and naming a version one of them lacks would fail the call.
        """
        limit = entry.max_batch_size or len(batch)
        chunks = [batch[i : i + limit] for i in range(0, len(batch), limit)]
        results = await asyncio.gather(*(self._infer_chunk(entry, version, c, timeout_s) for c in chunks))
        return np.concatenate([logits for logits, _ in results]), max(answered for _, answered in results)

    async def _infer_chunk(
        self, entry: ModelEntry, version: int, chunk: np.ndarray, timeout_s: float
    ) -> tuple[np.ndarray, int]:
        image = triton_aio.InferInput(contract.INPUT_NAME, list(chunk.shape), contract.INPUT_WIRE_DTYPE)
        image.set_data_from_numpy(chunk)
        output = triton_aio.InferRequestedOutput(contract.OUTPUT_NAME)
        try:
            async with self._channel() as client:
                result = await client.infer(
                    entry.name, [image], model_version=str(version) if version else "", outputs=[output],
                    client_timeout=timeout_s, timeout=max(1, int(timeout_s * 1e6)),
                )
        except InferenceServerException as exc:
            error = from_triton(exc, entry.name)
            if isinstance(error, NotFound):  # the model went away: re-read the repository soon
                task = asyncio.get_running_loop().create_task(self.refresh())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            if error is None:
                raise
            raise error from None
        except (TimeoutError, OSError) as exc:
            raise Unavailable(f"Triton is unavailable: {exc}") from None
        logits = result.as_numpy(contract.OUTPUT_NAME)
        if logits is None or logits.shape != (len(chunk), entry.num_classes):
            shape = None if logits is None else logits.shape
            raise RuntimeError(f"Triton returned logits of shape {shape} for {len(chunk)} images")
        answered = result.get_response().model_version
        return logits, int(answered) if answered.isdigit() else entry.resolve(version)

    async def close(self) -> None:
        for client in (self.client, *self._retired):
            await client.close()
        self._retired.clear()


def check_raw_size(width: int, height: int, entry: ModelEntry) -> None:
    if width != entry.image_size or height != entry.image_size:
        raise InvalidArgument(
            f"raw images must be {entry.image_size}x{entry.image_size} for {entry.name}, got {width}x{height}"
        )
