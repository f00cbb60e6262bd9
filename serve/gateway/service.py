"""The ``cliplora.v1.Classifier`` servicer: each RPC is its handler run under admission.

`Admission` (concurrency limit, request metrics, the error table, the drain at shutdown)
wraps every call; `Handlers` do Classify and Embed (validate -> resolve -> prepare ->
infer -> rank); the `Catalogue` answers ListModels.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from cliplora.serve.gateway.admission import Admission
from cliplora.serve.gateway.backend import TritonBackend
from cliplora.serve.gateway.catalogue import Catalogue
from cliplora.serve.gateway.handlers import Handlers
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, settings: GatewaySettings, triton: TritonBackend, metrics: GatewayMetrics,
                 pool: ThreadPoolExecutor) -> None:
        self.triton = triton
        self.metrics = metrics
        self.admission = Admission(settings.max_concurrent, metrics)
        self.handlers = Handlers(settings, triton, metrics, pool)
        self.catalogue = Catalogue(settings.repository, metrics)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self.admission.run(
            "Classify", context, lambda metric_labels: self.handlers.classify(request, context, metric_labels))

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self.admission.run(
            "Embed", context, lambda metric_labels: self.handlers.embed(request, context, metric_labels))

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async def list_models(metric_labels: dict[str, str]) -> pb.ListModelsResponse:
            return self.catalogue.list_models(await self.triton.refresh())

        return await self.admission.run("ListModels", context, list_models)
