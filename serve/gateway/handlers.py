"""Classify and Embed, each as one straight line: validate -> resolve -> prepare images
and texts -> infer -> rank (or reply).

- validate: `cliplora.serve.gateway.requests` (no model needed, nothing decoded yet);
- resolve: one lookup (`TritonBackend.lookup`) gives the `Route`: the model entry, the
  version the answer comes from, and the text side when the request needs it;
- prepare: images decoded and cropped in the thread pool (`images`), labels checked by
  the model's tokenizer and prompts built (`text_encoder`, `cliplora.core.open_vocab`);
- infer: one batched Triton call for the images, with what is left of the caller's
  deadline, beside the text encoder's call (or its cache) for the prompts;
- rank: `cliplora.core.predictions.rank` over the model's classes, the request's labels,
  or a bank adapter's classes.

A pinned call (open vocabulary, banks) names its version to Triton; if Triton has
unloaded that version meanwhile (a bank version replaced by the next one), the request is
resolved again and answered by the new version, once, instead of failing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from cliplora.core import contract
from cliplora.core.errors import DeadlineExceeded, InvalidArgument, NotFound
from cliplora.core.open_vocab import open_vocabulary_logits
from cliplora.core.predictions import rank
from cliplora.serve.gateway.adapter_traffic import AdapterTraffic
from cliplora.serve.gateway.admission import CallContext, MetricLabels
from cliplora.serve.gateway.backend import TritonBackend
from cliplora.serve.gateway.errors import VersionNotReady
from cliplora.serve.gateway.images import ImagePreparer
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.models import Route
from cliplora.serve.gateway.requests import ClassifyQuery, EmbedQuery
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.gateway.text_encoder import TextEncoder
from cliplora.v1 import classifier_pb2 as pb

T = TypeVar("T")
Q = TypeVar("Q", ClassifyQuery, EmbedQuery)


class Handlers:
    def __init__(self, settings: GatewaySettings, triton: TritonBackend, metrics: GatewayMetrics,
                 pool: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.triton = triton
        self.metrics = metrics
        self.images = ImagePreparer(pool, metrics, settings.max_pixels, settings.decoding)
        self.text = TextEncoder(triton, metrics, pool, settings.text_cache_entries)
        self.traffic = AdapterTraffic(metrics.adapter_requests, metrics.adapter_evictions, settings.adapter_series)

    async def classify(self, request: pb.ClassifyRequest, context: CallContext,
                       metric_labels: MetricLabels) -> pb.ClassifyResponse:
        deadline = self._deadline(context)
        query = ClassifyQuery.parse(request, self.settings)
        text = query.vocabulary is not None

        def resolve() -> Awaitable[Route]:
            return self.triton.lookup(query.model, query.version, text=text, embeds=text, adapter=query.adapter)

        route = await resolve()
        self._resolved(route, metric_labels)
        logits, version, names = await self._again_if_unloaded(route, resolve, self._logits, query, deadline)
        metric_labels["version"] = str(version)  # the version that answered
        return pb.ClassifyResponse(
            model=route.model_name, version=route.answered(version), adapter=route.adapter_id,
            results=[pb.Classification(predictions=[
                pb.Prediction(label=p.label, index=p.index, score=p.score, logit=p.logit)
                for p in rank(row, names, query.top_k)
            ]) for row in logits])

    async def embed(self, request: pb.EmbedRequest, context: CallContext,
                    metric_labels: MetricLabels) -> pb.EmbedResponse:
        deadline = self._deadline(context)
        query = EmbedQuery.parse(request, self.settings)

        def resolve() -> Awaitable[Route]:
            return self.triton.lookup(query.model, query.version, text=bool(query.texts), embeds=bool(query.images),
                                      adapter=query.adapter)

        route = await resolve()
        self._resolved(route, metric_labels)
        images, texts = await self._again_if_unloaded(route, resolve, self._embeddings, query, deadline)
        return pb.EmbedResponse(model=route.model_name, version=route.answered(route.version),
                                images=[pb.Embedding(values=row.tolist()) for row in images],
                                texts=[pb.Embedding(values=row.tolist()) for row in texts])

    def _resolved(self, route: Route, metric_labels: MetricLabels) -> None:
        """What a resolved request counts in: its model and version, and a bank's adapter."""
        metric_labels.update(model=route.entry.name, version=str(route.version))
        if route.adapter_id:
            self.traffic.count(route.model_name, route.adapter_id)

    async def _again_if_unloaded(self, route: Route, resolve: Callable[[], Awaitable[Route]],
                                 answer: Callable[[Route, Q, float], Awaitable[T]], query: Q, deadline: float) -> T:
        """`answer(route, query, deadline)`; if Triton no longer has the pinned version (it
        was replaced by a newer one since the lookup) or the promoted classifier (demoted),
        once more on the route `resolve` gives after a refresh."""
        try:
            return await answer(route, query, deadline)
        except (NotFound, VersionNotReady):
            if not route.pinned and route.promotion is None:
                raise
            await self.triton.refresh()
            again = await resolve()
            if (again.entry.name, again.version) == (route.entry.name, route.version):
                raise
            return await answer(again, query, deadline)

    async def _logits(self, route: Route, query: ClassifyQuery,
                      deadline: float) -> tuple[np.ndarray, int, Sequence[str]]:
        if query.vocabulary is not None:  # a classifier's or a bank adapter's text side
            return await self._label_logits(route, query, deadline)
        if route.adapter is not None:
            return await self._adapter_logits(route, query, deadline)
        return await self._class_logits(route, query, deadline)

    async def _embeddings(self, route: Route, query: EmbedQuery, deadline: float) -> tuple[np.ndarray, np.ndarray]:
        """(image embeddings, text embeddings), each [0, 0] when none were asked for."""
        none = np.zeros((0, 0), dtype=np.float32)
        if query.images and query.texts:
            (images, _), texts = await _together(self._embed_images(route, query.images, deadline),
                                                 self.text.embed(route, query.texts, deadline))
            return images, texts
        if query.images:
            return (await self._embed_images(route, query.images, deadline))[0], none
        return none, await self.text.embed(route, query.texts, deadline)

    async def _class_logits(self, route: Route, query: ClassifyQuery,
                            deadline: float) -> tuple[np.ndarray, int, Sequence[str]]:
        """The model's own head: (logits, the version that answered, its class names)."""
        batch = await self.images.batch(query.images, route.entry.image_size)
        logits, version = await self._infer(route, batch, deadline, contract.OUTPUT_NAME)
        return logits, version, route.entry.class_names

    async def _label_logits(self, route: Route, query: ClassifyQuery,
                            deadline: float) -> tuple[np.ndarray, int, Sequence[str]]:
        """Request-time labels: image embeddings and prompt embeddings, both at the route's
        pinned version, into logits (`RequestVocabulary.logits`)."""
        vocabulary, text_side = query.vocabulary, route.vocabulary
        assert vocabulary is not None and text_side is not None, "a labels route has its text side"
        prompts = vocabulary.prompts(text_side.templates, self.settings.max_prompts)
        batch, _ = await _together(self.images.batch(query.images, route.entry.image_size),
                                   self.text.check_distinct(route, vocabulary.labels))
        (image_embeddings, version), prompt_embeddings = await _together(
            self._infer(route, batch, deadline, contract.EMBEDS_NAME), self.text.embed(route, prompts, deadline))
        return vocabulary.logits(image_embeddings, prompt_embeddings, text_side.logit_scale), version, vocabulary.labels

    async def _adapter_logits(self, route: Route, query: ClassifyQuery,
                              deadline: float) -> tuple[np.ndarray, int, Sequence[str]]:
        """A bank adapter's classes: image embeddings through the bank with the adapter's slot,
        against the adapter's class embeddings (its companion's, kept once fetched)."""
        bank, row = route.entry.bank, route.adapter
        assert bank is not None and row is not None, "a bank's route has its adapter"
        if not row.num_classes:
            raise InvalidArgument(f"bank {route.entry.name!r} has no classes of its own: name an adapter "
                                  "(ListModels lists them)")
        batch = await self.images.batch(query.images, route.entry.image_size)
        (image_embeddings, version), head = await _together(
            self._infer(route, batch, deadline, contract.EMBEDS_NAME),
            self.triton.adapter_head(route, self._remaining(deadline)))
        return open_vocabulary_logits(image_embeddings, head.embeddings, bank.logit_scale), version, head.class_names

    async def _embed_images(self, route: Route, images: Sequence[pb.Image], deadline: float) -> tuple[np.ndarray, int]:
        batch = await self.images.batch(images, route.entry.image_size)
        return await self._infer(route, batch, deadline, contract.EMBEDS_NAME)

    async def _infer(self, route: Route, batch: np.ndarray, deadline: float, output: str) -> tuple[np.ndarray, int]:
        """One batched Triton call for `output`, with what is left of the deadline."""
        remaining = self._remaining(deadline)
        started = time.perf_counter()
        try:
            values, answered = await self.triton.infer_images(route, batch, remaining, output)
        finally:
            self.metrics.triton.labels(route.entry.name).observe(time.perf_counter() - started)
        self.metrics.images.labels(route.entry.name).inc(len(batch))
        return values, answered

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded before inference")
        return remaining

    def _deadline(self, context: CallContext) -> float:
        """The caller's deadline (or the default timeout) as a time.monotonic() value."""
        remaining = context.time_remaining()
        if remaining is None:
            return time.monotonic() + self.settings.default_timeout_s
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded on arrival")
        return time.monotonic() + remaining


async def _together(*awaitables: Awaitable[Any]) -> list[Any]:
    """Run side by side; if one fails, the others are cancelled before the error goes on."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
