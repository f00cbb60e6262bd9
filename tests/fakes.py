"""Stand-ins for the gateway's collaborators (Triton, the gRPC context), shared by the
unit and fuzz tests of the servicer."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from cliplora.core.errors import NotFound
from cliplora.serve.gateway import ClassifierService
from cliplora.serve.metrics import GatewayMetrics
from cliplora.serve.settings import GatewaySettings
from cliplora.serve.triton import ModelEntry
from tests import factories
from tests.serving import encoded

ENTRY = ModelEntry("m", (1, 2), image_size=16, num_classes=3, max_batch_size=4, labels=("a", "b", "c"))


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class FakeTriton:
    """Answers like Triton would for one model; logits = mean pixel value per class offset."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.delay, self.fail = delay, fail
        self.batches: list[np.ndarray] = []

    async def lookup(self, name: str, version: int):
        if name != "m":
            raise NotFound(f"model {name!r} not found (models: m)")
        return ENTRY, ENTRY.resolve(version)

    async def infer(self, entry, version, batch, timeout_s):
        self.batches.append(batch)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        mean = batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)
        return mean + np.array([[0.0, 1.0, -1.0]], dtype=np.float32), ENTRY.resolve(version)

    async def refresh(self):
        return {"m": ENTRY}


def service(triton: FakeTriton | None = None, **settings) -> ClassifierService:
    return ClassifierService(GatewaySettings(**settings), triton or FakeTriton(), GatewayMetrics(),
                             ThreadPoolExecutor(2))


def image_bytes(seed: int = 0) -> bytes:
    return encoded(factories.make_image(40, 30, seed=seed), "JPEG")
