"""The ``cliplora.v1.Classifier`` servicer: each RPC is its handler run under admission.

`Admission` (concurrency limit, request metrics, the error table, the drain at shutdown)
wraps every call; `Handlers` do Classify and Embed (validate -> resolve -> prepare ->
infer -> rank); the `Catalogue` answers ListModels.

Both doors call the same three methods: gRPC with its message (`Classify`, `Embed`,
`ListModels`), the HTTP door (`cliplora.serve.gateway.web`) with a coroutine function that
reads the HTTP body and builds the message (`classify`, `embed`, `list_models`). It runs
inside admission: a body is read only once its call holds a slot (over the limit: 429
before a byte of it is buffered), the drain at shutdown waits for a body still arriving,
and a malformed body is counted and answered like a bad gRPC message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from cliplora.serve.gateway.admission import Admission, CallContext, MetricLabels
from cliplora.serve.gateway.backend import TritonBackend
from cliplora.serve.gateway.catalogue import Catalogue
from cliplora.serve.gateway.handlers import Handlers
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc

M = TypeVar("M")
Parse = Callable[[], Awaitable[M]]  # the call's message, read and built once admitted


def _given(message: M) -> Parse[M]:
    """gRPC's message, already read and parsed by gRPC."""
    async def parse() -> M:
        return message

    return parse


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, settings: GatewaySettings, triton: TritonBackend, metrics: GatewayMetrics,
                 pool: ThreadPoolExecutor) -> None:
        self.triton = triton
        self.metrics = metrics
        self.admission = Admission(settings.max_concurrent, metrics)
        self.handlers = Handlers(settings, triton, metrics, pool)
        self.catalogue = Catalogue(settings.repository, metrics)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self.classify(_given(request), context)

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self.embed(_given(request), context)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return await self.list_models(context)

    async def classify(self, parse: Parse[pb.ClassifyRequest], context: CallContext) -> pb.ClassifyResponse:
        """Classify the message `parse` gives once the call is admitted (its errors are
        answered like any other)."""
        async def work(metric_labels: MetricLabels) -> pb.ClassifyResponse:
            return await self.handlers.classify(await parse(), context, metric_labels)

        return await self.admission.run("Classify", context, work)

    async def embed(self, parse: Parse[pb.EmbedRequest], context: CallContext) -> pb.EmbedResponse:
        async def work(metric_labels: MetricLabels) -> pb.EmbedResponse:
            return await self.handlers.embed(await parse(), context, metric_labels)

        return await self.admission.run("Embed", context, work)

    async def list_models(self, context: CallContext) -> pb.ListModelsResponse:
        async def work(metric_labels: MetricLabels) -> pb.ListModelsResponse:
            return self.catalogue.list_models(await self.triton.refresh())

        return await self.admission.run("ListModels", context, work)
