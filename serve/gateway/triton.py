"""The gateway's Triton (`TritonBackend`): one long-lived client, model discovery, inference.

Models, versions, input size, batch limit, class names and a bank's adapter tables and
class embeddings all come from Triton itself (`cliplora.serve.gateway.discovery`), so the
gateway needs no access to the model files. Discovery runs at start, every
`refresh_interval_s`, and whenever a request names a model, version or adapter the
gateway has not seen.

Scale-out: the channel balances calls round-robin over every address Triton's name
resolves to (a Kubernetes headless Service gives one per pod), and with
`renew_s` > 0 it is reopened that often, so the name is resolved again and replicas
added since get their share. A replaced channel is closed only when its last call
has ended: renewing loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from cliplora.core import contract
from cliplora.core.errors import NotFound, Unavailable
from cliplora.serve.gateway.discovery import Discovery, Tensor
from cliplora.serve.gateway.errors import NotLoadedTogether, from_triton
from cliplora.serve.gateway.models import AdapterHead, ModelEntry, Route

log = logging.getLogger(__name__)
CONTROL_TIMEOUT_S = 5.0
CHUNKS_IN_FLIGHT = 4  # max_batch_size chunks one call has at Triton at once
# A request that finds a model ready without the model it is served with at the same version
# (`NotLoadedTogether`: Triton's poll loads the two one after the other) waits this long,
# re-reading the repository every LOADS_POLL_S, before it answers UNAVAILABLE.
LOADS_WAIT_S = 5.0
LOADS_POLL_S = 0.2
ADAPTER_HEADS_KEPT = 1024  # banks: the class embeddings of this many (version, adapter) pairs stay in memory


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
        self._discovery = Discovery(self.call)
        self._heads: OrderedDict[tuple[str, int, int], AdapterHead] = OrderedDict()  # (bank, version, slot), LRU
        self._refresh_lock = asyncio.Lock()
        self._last_refresh_started = -math.inf  # monotonic time the newest completed refresh began
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
        """Re-read the repository index and configs; keeps the old view if Triton is down.
        The view returned was read after the call began: callers that wait for a read in
        progress share the next one (a burst of requests meeting a reloaded version, the
        wait for a second load below), rather than each reading again."""
        asked = time.monotonic()
        async with self._refresh_lock:
            if self._last_refresh_started >= asked:
                return self.models
            started = time.monotonic()
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
            found = await self._discovery.describe(ready, await self._configs(sorted(ready)))
            if set(found) != set(self._models):
                log.info("models now served: %s", ", ".join(f"{n} {list(e.versions)}" for n, e in found.items()) or "none")
            self._models = found
            self._last_refresh_started = started
            for callback in self.on_refresh:
                callback(self.models)
            return self.models

    async def _configs(self, names: list[str]) -> dict[str, dict[str, Any]]:
        configs: dict[str, dict[str, Any]] = {}
        for name in names:
            try:
                async with self._channel() as client:
                    response = await client.get_model_config(name, as_json=True, client_timeout=CONTROL_TIMEOUT_S)
                configs[name] = response.get("config", response)
            except InferenceServerException as exc:
                log.warning("skipping model %s: %s", name, exc)
        return configs

    async def lookup(self, name: str, version: int, *, text: bool = False, embeds: bool = False,
                     adapter: str = "") -> Route:
        """The route of a request (`ModelEntry.route`): its model entry and version, its text
        side when it needs it, and for a bank the row of `adapter` (empty: its base).
        Refreshes once if the model, the version or the adapter is unknown, or with `text`
        when the text encoder, or its version, was not ready at the last look (the two
        models load one after the other)."""
        entry = self._models.get(name)
        if entry is None or _stale(entry, version, text or (embeds and entry.bank is None), adapter):
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
        try:
            return entry.route(version, text=text, embeds=embeds, adapter=adapter)
        except NotLoadedTogether:
            return await self._route_once_loaded_together(name, version, text=text, embeds=embeds, adapter=adapter)

    async def _route_once_loaded_together(self, name: str, version: int, *, text: bool, embeds: bool,
                                          adapter: str) -> Route:
        """The route, once Triton has loaded the second of two models served together (a
        bank and its adapter table during `bank add`, a model and its text encoder): up to
        LOADS_WAIT_S, then the last NotLoadedTogether (UNAVAILABLE)."""
        give_up = time.monotonic() + LOADS_WAIT_S
        while True:
            await asyncio.sleep(LOADS_POLL_S)
            await self.refresh()
            entry = self._models.get(name)
            if entry is None:
                raise NotFound(f"model {name!r} not found (it was unloaded)")
            try:
                return entry.route(version, text=text, embeds=embeds, adapter=adapter)
            except NotLoadedTogether:
                if time.monotonic() >= give_up:
                    raise

    async def infer_images(self, route: Route, batch: np.ndarray, timeout_s: float,
                           output: str = contract.OUTPUT_NAME) -> tuple[np.ndarray, int]:
        """(`output` [N, C] logits or [N, D] image_embeds, the version that answered) for a
        uint8 batch [N, S, S, 3], split to the model's batch limit. Triton sends only the
        output asked for. The version asked for is `route.triton_version`; a bank's call
        names the route's adapter slot for every image."""
        entry = route.entry
        inputs: list[Tensor] = [(contract.INPUT_NAME, batch, contract.INPUT_WIRE_DTYPE)]
        if entry.bank is not None and route.adapter is not None:
            width = entry.bank.embedding_dim
            slots = np.full((len(batch), 1), route.adapter.slot, dtype=contract.BANK_ADAPTER_NUMPY_DTYPE)
            inputs.append((contract.BANK_ADAPTER_NAME, slots, contract.BANK_ADAPTER_WIRE_DTYPE))
        elif output == contract.OUTPUT_NAME:
            width = entry.num_classes
        elif route.vocabulary is not None:
            width = route.vocabulary.embedding_dim
        else:
            raise ValueError(f"{output} of {entry.name} asked for without its text side")
        return await self._chunked(entry.name, route.triton_version, inputs, entry.max_batch_size, timeout_s,
                                   output, width, route.version)

    async def embed_texts(self, route: Route, tokens: np.ndarray, timeout_s: float) -> np.ndarray:
        """[N, D] unit text embeddings from the route's text encoder, at the route's version
        (the classifier's own: the two are published together)."""
        if route.vocabulary is None:
            raise ValueError(f"texts of {route.entry.name} asked for without its text side")
        text = route.vocabulary.text
        route.check_version(route.version)
        inputs: list[Tensor] = [(contract.TEXT_INPUT_NAME, tokens, contract.TEXT_INPUT_WIRE_DTYPE)]
        if text.per_adapter and route.adapter is not None:  # a bank's: each prompt through the adapter's tower
            slots = np.full((len(tokens), 1), route.adapter.slot, dtype=contract.BANK_ADAPTER_NUMPY_DTYPE)
            inputs.append((contract.BANK_ADAPTER_NAME, slots, contract.BANK_ADAPTER_WIRE_DTYPE))
        embeddings, _ = await self._chunked(text.name, route.version, inputs, text.max_batch_size, timeout_s,
                                            contract.TEXT_OUTPUT_NAME, text.embedding_dim, route.version)
        return embeddings

    async def adapter_head(self, route: Route, timeout_s: float) -> AdapterHead:
        """A bank adapter's class embeddings and names, from the bank's companion at the
        route's version (kept for the next call: a version's slot never changes)."""
        bank, row = route.entry.bank, route.adapter
        if bank is None or row is None:
            raise ValueError(f"the route of {route.entry.name} is not a bank adapter's")
        key = (route.entry.name, route.version, row.slot)
        head = self._heads.get(key)
        if head is None:
            slot = np.array([row.slot], dtype=contract.BANK_ADAPTER_NUMPY_DTYPE)
            result = await self.call(bank.adapters_model, route.version,
                                     [(contract.BANK_ADAPTER_NAME, slot, contract.BANK_ADAPTER_WIRE_DTYPE)],
                                     [contract.CLASS_EMBEDS_NAME, contract.CLASS_COUNT_NAME, contract.CLASS_NAMES_NAME],
                                     timeout_s)
            count = int(result.as_numpy(contract.CLASS_COUNT_NAME).reshape(-1)[0])
            embeddings = result.as_numpy(contract.CLASS_EMBEDS_NAME)[:count].astype(np.float32)
            names = tuple(n.decode("utf-8") for n in result.as_numpy(contract.CLASS_NAMES_NAME).reshape(-1)[:count])
            if embeddings.shape != (row.num_classes, bank.embedding_dim) or len(names) != row.num_classes:
                raise RuntimeError(f"{bank.adapters_model} returned {embeddings.shape} class embeddings and "
                                   f"{len(names)} names for adapter {row.adapter!r} of {row.num_classes} classes")
            head = AdapterHead(embeddings, names)
            self._heads[key] = head
            if len(self._heads) > ADAPTER_HEADS_KEPT:
                self._heads.popitem(last=False)
        self._heads.move_to_end(key)
        return head

    async def _chunked(self, model: str, version: int, inputs: list[Tensor], max_batch: int, timeout_s: float,
                       output: str, width: int, expected_version: int) -> tuple[np.ndarray, int]:
        """One call's inputs in chunks of the model's batch limit, at most CHUNKS_IN_FLIGHT at
        Triton at once; (outputs in order, the newest version that answered)."""
        count = len(inputs[0][1])
        limit = max_batch or count
        in_flight = asyncio.Semaphore(CHUNKS_IN_FLIGHT)  # one call's share of Triton, however many prompts

        async def one(start: int) -> tuple[np.ndarray, int]:
            chunk = [(name, values[start : start + limit], dtype) for name, values, dtype in inputs]
            async with in_flight:
                return await self._infer_chunk(model, version, chunk, timeout_s, output, width, expected_version)

        results = await asyncio.gather(*(one(start) for start in range(0, count, limit)))
        return np.concatenate([values for values, _ in results]), max(answered for _, answered in results)

    async def _infer_chunk(self, model: str, version: int, inputs: list[Tensor], timeout_s: float,
                           output: str, width: int, expected_version: int) -> tuple[np.ndarray, int]:
        result = await self.call(model, version, inputs, [output], timeout_s)
        values = result.as_numpy(output)
        rows = len(inputs[0][1])
        if values is None or values.shape != (rows, width):
            shape = None if values is None else values.shape
            raise RuntimeError(f"Triton returned {output} of shape {shape} for {rows} inputs of {model}")
        answered = result.get_response().model_version
        return values, int(answered) if answered.isdigit() else expected_version

    async def call(self, model: str, version: int, inputs: Sequence[Tensor], outputs: Sequence[str],
                   timeout_s: float, class_count: int = 0) -> triton_aio.InferResult:
        """One inference call (version 0: Triton's latest), Triton's errors as domain errors;
        a model that went away makes discovery run again soon."""
        tensors = []
        for name, values, dtype in inputs:
            tensor = triton_aio.InferInput(name, list(values.shape), dtype)
            tensor.set_data_from_numpy(values)
            tensors.append(tensor)
        requested = [triton_aio.InferRequestedOutput(name, class_count=class_count) for name in outputs]
        try:
            async with self._channel() as client:
                return await client.infer(
                    model, tensors, model_version=str(version) if version else "", outputs=requested,
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

    async def close(self) -> None:
        for client in (self.client, *self._retired):
            await client.close()
        self._retired.clear()


def _stale(entry: ModelEntry, version: int, text: bool, adapter: str) -> bool:
    """Whether the last look may be out of date for this request: a version, a text side or
    (in the newest table) an adapter it has not seen."""
    if version and version not in entry.versions:
        return True
    if text and entry.text_missing(version):
        return True
    if entry.bank is not None and adapter:
        tables = entry.bank.tables
        return not tables or adapter not in tables[version if version in tables else max(tables)]
    return False
