"""Where the load goes: the gateway (gRPC, or its HTTP door: `cliplora.loadtest.http_door`),
Triton directly, or ONNX Runtime in this process.

Every target sends one request of `batch` images for a given model and raises on any
failure; the runner measures. Images are prepared once, before the clock starts. Each
entry walks through the same batches in the same order (`entry_turn`), so interleaved
entries are offered the same images.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
import numpy as np

from cliplora.core import contract
from cliplora.core.errors import NotFound
from cliplora.core.preprocess import preprocess_bytes
from cliplora.core.runtime import open_published, run_logits
from cliplora.loadtest.entries import GRPC, AdapterChooser, Entry, bank_chooser, cold_labels
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc

T = TypeVar("T")


def rotating_batches(items: list[T], batch: int) -> list[list[T]]:
    """One batch per starting item: items[i], items[i+1], ... wrapping around, `batch` long."""
    return [[items[(start + j) % len(items)] for j in range(batch)] for start in range(len(items))]


def entry_turn(item: int, entries: int) -> int:
    """Which request of its own entry the runner's request `item` is: the runner sends item i
    to entry i % `entries`, so item // `entries` counts each entry's requests 0, 1, 2, ...
    (Picking batches by `item` itself would give two interleaved entries disjoint halves
    of the images.)"""
    return item // entries


class Target(Protocol):
    description: str

    async def start(self, models: list[str]) -> None: ...

    async def send(self, model: str, item: int) -> None: ...

    async def close(self) -> None: ...


class RequestFailed(Exception):
    """A failed request, with the status code name the report counts."""

    def __init__(self, code: str, details: str = "") -> None:
        super().__init__(f"{code}: {details}")
        self.code = code


class GatewayTarget:
    """`cliplora.v1.Classifier/Classify` over gRPC (the gateway, or any server with the API).

    Each ``--models`` entry (`cliplora.loadtest.entries`) has its requests built once; a
    ``NAME@*`` entry's request names the adapter its `AdapterChooser` picks for the item.
    """

    def __init__(self, address: str, images: list[bytes], *, batch: int = 1, raw: bool = False,
                 timeout_s: float = 60.0, top_k: int = 5, entries: dict[str, Entry] | None = None,
                 adapter_skew: float | None = None, seed: int = 0) -> None:
        self.address, self.images, self.batch, self.raw = address, images, batch, raw
        self.timeout_s, self.top_k = timeout_s, top_k
        self.entries = entries or {}
        self.adapter_skew, self.seed = adapter_skew, seed
        self.description = f"gateway {address}" + (" (raw RGB)" if raw else " (encoded images)")
        self._requests: dict[str, list[pb.ClassifyRequest]] = {}
        self._choosers: dict[str, tuple[AdapterChooser, Iterator[int]]] = {}  # NAME@*: chooser, its own count
        self._stride = 1

    async def start(self, models: list[str]) -> None:
        """Open the channel and write the requests of the gRPC entries among `models` (all
        the run's entries, in the runner's order: ``http:`` entries are another target's)."""
        from cliplora.core.client import token_metadata

        self.channel = grpc.aio.insecure_channel(self.address, options=[("grpc.max_send_message_length", 1 << 28)])
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.metadata = token_metadata()  # CLIPLORA_TOKEN, when the gateway wants one
        listing = await self.stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=self.metadata)
        served = {m.name: m for m in listing.models}
        self._stride = len(models)
        for name in models:
            entry = self.entries.get(name) or Entry(name, name)
            if entry.door != GRPC:
                continue
            if entry.every_adapter:
                self._choosers[name] = (self._chooser(entry, served), itertools.count())
            requests = []
            for chosen in rotating_batches(self.images, self.batch):
                requests.append(pb.ClassifyRequest(
                    model=entry.model, images=self._images(chosen, served, entry.model), top_k=self.top_k,
                    labels=entry.labels, templates=entry.templates,
                    adapter="" if entry.every_adapter else entry.adapter))
            self._requests[name] = requests

    def _chooser(self, entry: Entry, served: dict[str, pb.ModelInfo]) -> AdapterChooser:
        info = served.get(entry.model)
        return bank_chooser(entry, info.kind if info else "", (a.id for a in info.adapters) if info else (),
                            self.adapter_skew, self.seed, "the gateway")

    def _images(self, chosen: list[bytes], served: dict[str, pb.ModelInfo], model: str) -> list[pb.Image]:
        if not self.raw:
            return [pb.Image(encoded=data) for data in chosen]
        if model not in served:
            raise NotFound(f"model {model!r} not served (--raw needs its image size)")
        size = served[model].image_size
        return [pb.Image(raw=pb.RawImage(rgb=preprocess_bytes(data, size).tobytes(), width=size, height=size))
                for data in chosen]

    async def send(self, model: str, item: int) -> None:
        requests = self._requests[model]
        request = requests[entry_turn(item, self._stride) % len(requests)]
        entry = self.entries.get(model)
        if entry is not None and (entry.cold or entry.every_adapter):
            fresh = pb.ClassifyRequest()
            fresh.CopyFrom(request)
            if entry.cold:  # labels no call has used before
                fresh.labels[:] = cold_labels(request.labels, item)
            if entry.every_adapter:  # the entry's own count: items of interleaved entries skip numbers
                chooser, count = self._choosers[model]
                fresh.adapter = chooser(next(count))
            request = fresh
        try:
            await self.stub.Classify(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(exc.code().name, exc.details() or "") from None

    async def close(self) -> None:
        await self.channel.close()


class DoorsTarget:
    """Entries through both of the gateway's doors in one run (``base,http:base``): each
    entry's requests go to the target of its door, `targets` keyed by door (GRPC, HTTP)."""

    def __init__(self, targets: dict[str, Target], entries: dict[str, Entry]) -> None:
        self.targets, self.entries = targets, entries
        self.description = " and ".join(target.description for target in targets.values())
        self._route: dict[str, Target] = {}

    async def start(self, models: list[str]) -> None:
        """Start every door's target on all the entries (each writes its own door's); a
        failure closes the ones already started."""
        started: list[Target] = []
        try:
            for target in self.targets.values():
                await target.start(models)
                started.append(target)
        except BaseException:
            for target in started:
                await target.close()
            raise
        self._route = {name: self.targets[self.entries[name].door] for name in models}

    async def send(self, model: str, item: int) -> None:
        await self._route[model].send(model, item)

    async def close(self) -> None:
        for target in self.targets.values():
            await target.close()


class TritonTarget:
    """Triton's KServe v2 gRPC infer with the uint8 crops (what the gateway sends)."""

    def __init__(self, address: str, images: list[bytes], *, batch: int = 1, timeout_s: float = 60.0) -> None:
        self.address, self.images, self.batch, self.timeout_s = address, images, batch, timeout_s
        self.description = f"Triton {address} directly (uint8 crops)"
        self._batches: dict[str, list[np.ndarray]] = {}
        self._stride = 1

    async def start(self, models: list[str]) -> None:
        import tritonclient.grpc.aio as triton_aio

        self._stride = len(models)

        self._aio = triton_aio
        self.client = triton_aio.InferenceServerClient(self.address)
        for model in models:
            config = await self.client.get_model_config(model, as_json=True)
            size = contract.classifier_shape(model, config["config"]).image_size
            crops = [preprocess_bytes(data, size) for data in self.images]
            self._batches[model] = [np.stack(chosen) for chosen in rotating_batches(crops, self.batch)]

    async def send(self, model: str, item: int) -> None:
        from tritonclient.utils import InferenceServerException

        batches = self._batches[model]
        batch = batches[entry_turn(item, self._stride) % len(batches)]
        image = self._aio.InferInput(contract.INPUT_NAME, list(batch.shape), contract.INPUT_WIRE_DTYPE)
        image.set_data_from_numpy(batch)
        try:
            await self.client.infer(model, [image], outputs=[self._aio.InferRequestedOutput(contract.OUTPUT_NAME)],
                                    client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise RequestFailed(str(exc.status() or "UNKNOWN").removeprefix("StatusCode."), exc.message() or "") from None

    async def close(self) -> None:
        await self.client.close()


class InProcessTarget:
    """ONNX Runtime in this process on the uint8 crops: no server, no network."""

    def __init__(self, repository: Path, images: list[bytes], *, batch: int = 1, threads: int = 0,
                 workers: int = 1) -> None:
        self.repository, self.images, self.batch = Path(repository), images, batch
        self.threads, self.workers = threads, workers
        self.description = f"in-process ONNX Runtime ({repository})"
        self._sessions: dict[str, object] = {}
        self._batches: dict[str, list[np.ndarray]] = {}
        self._stride = 1

    async def start(self, models: list[str]) -> None:
        self.pool = ThreadPoolExecutor(self.workers)
        self._stride = len(models)
        for model in models:
            published = open_published(self.repository, model, threads=self.threads)
            crops = [preprocess_bytes(data, published.image_size) for data in self.images]
            self._sessions[model] = published.session
            self._batches[model] = [np.stack(chosen) for chosen in rotating_batches(crops, self.batch)]

    async def send(self, model: str, item: int) -> None:
        batches = self._batches[model]
        await asyncio.get_running_loop().run_in_executor(self.pool, run_logits, self._sessions[model],
                                                         batches[entry_turn(item, self._stride) % len(batches)])

    async def close(self) -> None:
        self.pool.shutdown(wait=True)
