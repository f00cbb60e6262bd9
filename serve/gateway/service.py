"""The ``cliplora.v1.Classifier`` service: validate, preprocess off the loop, route to Triton.

One request: validate cheap things first (name, image count, sizes, top_k, labels) ->
look the model up (NOT_FOUND before any decoding) -> decode + resize + crop every image
in the thread pool (Pillow releases the GIL) -> one batched Triton call with what is left
of the caller's deadline -> rank -> reply. Beyond `max_concurrent` requests in flight the
gateway answers RESOURCE_EXHAUSTED at once instead of queueing without bound.

With request-time ``labels`` (models exported with ``--open-vocabulary``) the image call
asks for ``image_embeds`` instead of ``logits``, while the prompts are embedded at the
same time (`serve.text_encoder`, cached), and the head is built as the export builds it
(`cliplora.core.open_vocab`). ``Embed`` returns either kind of embedding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import numpy as np

from cliplora.core import contract, open_vocab
from cliplora.core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from cliplora.core.manifest import Manifest
from cliplora.core.open_vocab import validate_labels, validate_templates, validate_texts
from cliplora.core.predictions import rank, validate_top_k
from cliplora.core.preprocess import preprocess_bytes
from cliplora.core.repository import ModelRepository, validate_model_name
from cliplora.serve.gateway.errors import to_status
from cliplora.serve.gateway.metrics import UNKNOWN, GatewayMetrics
from cliplora.serve.gateway.settings import GatewaySettings
from cliplora.serve.gateway.text_encoder import TextEncoder
from cliplora.serve.gateway.triton import (
    ModelEntry,
    Triton,
    check_raw_size,
    require_open_vocabulary,
)
from cliplora.v1 import classifier_pb2 as pb
from cliplora.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
DEFAULT_TOP_K = 5
DEADLINE_SLACK_S = 0.1
T = TypeVar("T")


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, settings: GatewaySettings, triton: Triton, metrics: GatewayMetrics, pool: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.triton = triton
        self.metrics = metrics
        self.pool = pool
        self.in_flight = 0
        self.accepted = 0  # requests admitted past the concurrency limit, ever
        self._calls: set[asyncio.Future[object]] = set()  # the work of the calls in flight
        self.text = TextEncoder(triton, metrics, pool, settings.text_cache_entries)
        self._repository = ModelRepository(settings.repository) if settings.repository is not None else None
        # (name, version) -> (manifest file's mtime, manifest): read again only when the file changes
        self._manifests: dict[tuple[str, int], tuple[int, Manifest]] = {}

    async def _handle(self, method: str, context: grpc.aio.ServicerContext,
                      work: Callable[[dict[str, str]], Awaitable[T]]) -> T:
        """Concurrency limit, metrics and the error table around one call.

        The work runs as a task of its own, so that `drain` can end it when the
        shutdown's grace period is over and the caller still hears UNAVAILABLE (not a
        bare CANCELLED). A call gRPC cancels itself is counted as DEADLINE_EXCEEDED when
        its deadline had passed (what the caller sees), CANCELLED otherwise.
        """
        start = time.perf_counter()
        labels = {"model": UNKNOWN, "version": ""}
        code = grpc.StatusCode.OK
        message = ""
        if self.in_flight >= self.settings.max_concurrent:
            self.metrics.rejected.inc()
            code, message = to_status(
                ResourceExhausted(f"gateway busy: {self.in_flight} requests in flight (limit {self.settings.max_concurrent})"),
                method)
            self._observe(method, labels, code, start)
        else:
            self.in_flight += 1
            self.accepted += 1
            self.metrics.in_flight.inc()
            task = asyncio.ensure_future(work(labels))
            self._calls.add(task)
            try:
                return await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():  # gRPC ended the call: deadline or the caller
                    # The caller's own deadline fires a little before ours (ours started when the
                    # call arrived), and its cancellation reaches us first: within DEADLINE_SLACK_S
                    # of our deadline it is the deadline that ended the call.
                    remaining = context.time_remaining()
                    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                    raise
                code, message = to_status(Unavailable(
                    "the gateway is shutting down and the call did not finish within its grace period"), method)
            except Exception as exc:  # the error table decides; INTERNAL hides details
                code, message = to_status(exc, method)
            finally:
                self._calls.discard(task)
                self._observe(method, labels, code, start)  # before the slot is seen free
                self.in_flight -= 1
                self.metrics.in_flight.dec()
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for the calls in flight; end the rest (UNAVAILABLE).
        Returns how many were cut."""
        deadline = time.monotonic() + grace_s
        while self._calls and time.monotonic() < deadline:
            await asyncio.wait(set(self._calls), timeout=deadline - time.monotonic())
        cut = list(self._calls)
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.gather(*cut, return_exceptions=True)
            log.warning("grace period of %.1f s over: %d calls in flight ended with UNAVAILABLE", grace_s, len(cut))
        return len(cut)

    def _observe(self, method: str, labels: dict[str, str], code: grpc.StatusCode, start: float) -> None:
        self.metrics.requests.labels(labels["model"], labels["version"], method, code.name).observe(
            time.perf_counter() - start)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self._handle("Classify", context, lambda labels: self._classify(request, context, labels))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return await self._handle("ListModels", context, lambda labels: self._list_models())

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self._handle("Embed", context, lambda labels: self._embed(request, context, labels))

    def _check_request(self, model: str, version: int, images: Sequence[pb.Image], min_images: int) -> None:
        """The checks that need no model: name, version, image count and sizes."""
        validate_model_name(model)
        if version < 0:
            raise InvalidArgument(f"version must be 0 (latest) or a version number, got {version}")
        count = len(images)
        if not min_images <= count <= self.settings.max_images:
            raise InvalidArgument(f"send {min_images} to {self.settings.max_images} images per request, got {count}")
        for i, image in enumerate(images):
            kind = image.WhichOneof("data")
            if kind is None:
                raise InvalidArgument(f"image {i} is empty: set encoded or raw")
            size = len(image.encoded) if kind == "encoded" else len(image.raw.rgb)
            if size > self.settings.max_image_bytes:
                raise InvalidArgument(f"image {i} has {size} bytes; the limit is {self.settings.max_image_bytes}")

    async def _classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext,
                        labels: dict[str, str]) -> pb.ClassifyResponse:
        deadline = time.monotonic() + self._budget(context)
        self._check_request(request.model, request.version, request.images, 1)
        top_k = validate_top_k(request.top_k if request.HasField("top_k") else DEFAULT_TOP_K)
        limits = self.settings.vocabulary_limits
        vocabulary = templates = None
        if request.labels or request.templates:
            if not request.labels:
                raise InvalidArgument("templates go with labels: send the labels to rank with them")
            vocabulary = validate_labels(request.labels, limits)
            if request.templates:
                templates = validate_templates(request.templates, limits)

        entry, version = await self.triton.lookup(request.model, request.version, text=vocabulary is not None)
        labels.update(model=entry.name, version=str(version))
        if vocabulary is None:
            logits, version = await self._images(request.images, entry, request.version, deadline, contract.OUTPUT_NAME)
            names: Sequence[str] = entry.labels
        else:
            ov = require_open_vocabulary(entry)
            text_prompts = open_vocab.request_prompts(vocabulary, templates, ov.templates, limits.max_prompts)
            # Image and text side pinned to one version: they are published together.
            version = entry.pinned(request.version)
            labels.update(version=str(version))
            embeddings, prompt_embeddings = await _together(
                self._images(request.images, entry, version, deadline, contract.EMBEDS_NAME),
                self.text.embed(entry, version, text_prompts, deadline))
            image_embeddings, version = embeddings
            heads = open_vocab.label_embeddings(prompt_embeddings, len(vocabulary))
            logits = open_vocab.open_vocabulary_logits(image_embeddings, heads, ov.logit_scale)
            names = vocabulary
        labels.update(version=str(version))
        return pb.ClassifyResponse(
            model=entry.name,
            version=version,
            results=[
                pb.Classification(predictions=[
                    pb.Prediction(label=p.label, index=p.index, score=p.score, logit=p.logit)
                    for p in rank(row, names, top_k)
                ])
                for row in logits
            ],
        )

    async def _embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext,
                     labels: dict[str, str]) -> pb.EmbedResponse:
        deadline = time.monotonic() + self._budget(context)
        self._check_request(request.model, request.version, request.images, 0)
        if not request.images and not request.texts:
            raise InvalidArgument("nothing to embed: send images, texts or both")
        texts = validate_texts(request.texts, self.settings.vocabulary_limits)

        entry, version = await self.triton.lookup(request.model, request.version, text=True)
        require_open_vocabulary(entry)
        version = entry.pinned(request.version)
        labels.update(model=entry.name, version=str(version))
        parts = []
        if request.images:
            parts.append(self._images(request.images, entry, version, deadline, contract.EMBEDS_NAME))
        if request.texts:
            parts.append(self.text.embed(entry, version, texts, deadline))
        results = await _together(*parts)
        images = results.pop(0)[0] if request.images else np.zeros((0, 0), dtype=np.float32)
        texts = results.pop(0) if request.texts else np.zeros((0, 0), dtype=np.float32)
        return pb.EmbedResponse(model=entry.name, version=version,
                                images=[pb.Embedding(values=row.tolist()) for row in images],
                                texts=[pb.Embedding(values=row.tolist()) for row in texts])

    async def _images(self, images: Sequence[pb.Image], entry: ModelEntry, version: int, deadline: float,
                      output: str) -> tuple[np.ndarray, int]:
        """Decode and crop off the loop, then one batched Triton call for `output`."""
        batch = await self._preprocess(images, entry)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded before inference")
        started = time.perf_counter()
        try:
            values, answered = await self.triton.infer(entry, version, batch, remaining, output)
        finally:
            self.metrics.triton.labels(entry.name).observe(time.perf_counter() - started)
        self.metrics.images.labels(entry.name).inc(len(images))
        return values, answered

    def _budget(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.settings.default_timeout_s
        if remaining <= 0:
            raise DeadlineExceeded("deadline exceeded on arrival")
        return remaining

    async def _preprocess(self, images: Sequence[pb.Image], entry: ModelEntry) -> np.ndarray:
        loop = asyncio.get_running_loop()
        crops = await asyncio.gather(*(
            loop.run_in_executor(self.pool, self._prepare, i, image, entry) for i, image in enumerate(images)
        ))
        return np.stack(crops)

    def _prepare(self, index: int, image: pb.Image, entry: ModelEntry) -> np.ndarray:
        """One image to the model's uint8 input; runs in the thread pool."""
        started = time.perf_counter()
        try:
            if image.WhichOneof("data") == "raw":
                raw = image.raw
                check_raw_size(raw.width, raw.height, entry)
                expected = raw.width * raw.height * contract.CHANNELS
                if len(raw.rgb) != expected:
                    raise InvalidArgument(f"raw RGB needs {expected} bytes, got {len(raw.rgb)}")
                return np.frombuffer(raw.rgb, dtype=np.uint8).reshape(raw.height, raw.width, contract.CHANNELS)
            return preprocess_bytes(image.encoded, entry.image_size, max_pixels=self.settings.max_pixels)
        except InvalidArgument as exc:
            raise InvalidArgument(f"image {index}: {exc}") from None
        finally:
            self.metrics.preprocess.observe(time.perf_counter() - started)

    async def _list_models(self) -> pb.ListModelsResponse:
        models = await self.triton.refresh()
        return pb.ListModelsResponse(models=[self._model_info(entry) for entry in models.values()])

    def manifest_of(self, entry: ModelEntry) -> Manifest | None:
        """The latest version's manifest, when the gateway can read the repository."""
        if self._repository is None:
            return None
        key = (entry.name, entry.versions[-1])
        try:
            found = self._repository.get(*key)
            changed = found.manifest_path.stat().st_mtime_ns
            cached = self._manifests.get(key)
            if cached is None or cached[0] != changed:
                self._manifests[key] = cached = (changed, found.manifest())
            return cached[1]
        except Exception as exc:  # provenance is optional: never fail a call for it
            log.debug("no manifest for %s: %s", entry.name, exc)
            return None

    def publish_model_info(self, models: dict[str, ModelEntry]) -> None:
        """``cliplora_gateway_model_info``: what pairs a LoRA model with its base in the alert rules."""
        self.metrics.model_info.clear()
        for entry in models.values():
            manifest = self.manifest_of(entry)
            if manifest is None:
                self.metrics.model_info.labels(entry.name, "", "", "unknown").set(1)
            else:
                self.metrics.model_info.labels(entry.name, manifest.base.model, manifest.base_weights_id,
                                               manifest.lora.format).set(1)

    def _model_info(self, entry: ModelEntry) -> pb.ModelInfo:
        info = pb.ModelInfo(name=entry.name, versions=list(entry.versions), num_classes=entry.num_classes,
                            image_size=entry.image_size, open_vocabulary=entry.open_vocabulary is not None,
                            embedding_dim=entry.open_vocabulary.embedding_dim if entry.open_vocabulary else 0)
        manifest = self.manifest_of(entry)
        if manifest is not None:
            info.base_model = manifest.base.model
            info.weights = manifest.base.weights.source
            info.lora_format = manifest.lora.format
            info.lora_json = json.dumps(manifest.lora.model_dump(mode="json", exclude_unset=True), sort_keys=True)
            info.precision = manifest.precision
        return info


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
