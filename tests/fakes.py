"""Stand-ins for the gateway's collaborators (Triton, the gRPC context), shared by the
unit and fuzz tests of the servicer. `FakeTriton` implements
`cliplora.serve.gateway.backend.TritonBackend`; tests/test_gateway_unit.py checks it
member by member against that declaration. No torch and no export stack here."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from cliplora.core import contract
from cliplora.core.errors import NotFound
from cliplora.core.tokenizer import get_tokenizer
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.models import (
    AdapterHead,
    BankSide,
    ModelEntry,
    OpenVocabulary,
    Route,
    TextEntry,
)
from cliplora.serve.gateway.service import ClassifierService
from cliplora.serve.gateway.settings import GatewaySettings
from tests.images import encoded, make_image

ENTRY = ModelEntry("m", (1, 2), image_size=16, num_classes=3, max_batch_size=4, class_names=("a", "b", "c"))
EMBEDDING_DIM = 8
OPEN = ModelEntry("ov", (1, 2), image_size=16, num_classes=3, max_batch_size=4, class_names=("a", "b", "c"),
                  open_vocabulary=OpenVocabulary(
                      TextEntry("ov_text", (1, 2), EMBEDDING_DIM, max_batch_size=4, classifier="ov"),
                      logit_scale=10.0, templates=("a photo of a {}.",),
                      vocab_sha256=get_tokenizer().vocab_sha256))


def adapter_row(adapter: str, slot: int, num_classes: int, version_added: int = 1) -> contract.AdapterRow:
    return contract.AdapterRow(adapter=adapter, slot=slot, num_classes=num_classes, rank=0 if slot == 0 else 2,
                               matrices=() if slot == 0 else ("q", "k", "v"), encoders=() if slot == 0 else ("vision",),
                               lora_sha256="" if slot == 0 else f"{slot:064x}", version_added=version_added,
                               templates=("a photo of a {}.",))


def bank_entry(tables: dict[int, list[contract.AdapterRow]], name: str = "bank", *,
               text_versions: tuple[int, ...] | None = None, text_model: str | None = None) -> ModelEntry:
    """A bank whose versions are the keys of `tables`, each with its adapter rows; with
    `text_versions`, a ready text encoder (`--open-vocabulary`); with `text_model` alone,
    one that is not ready."""
    text = None
    if text_versions is not None:
        text_model = f"{name}_text"
        text = TextEntry(text_model, text_versions, EMBEDDING_DIM, max_batch_size=4, classifier=name, per_adapter=True)
    return ModelEntry(name, tuple(sorted(tables)), image_size=16, num_classes=tables[max(tables)][0].num_classes,
                      max_batch_size=4, class_names=(),
                      bank=BankSide(f"{name}{contract.ADAPTERS_MODEL_SUFFIX}", logit_scale=10.0,
                                    embedding_dim=EMBEDDING_DIM,
                                    tables={v: {row.adapter: row for row in rows} for v, rows in tables.items()},
                                    text=text, text_model=text_model, vocab_sha256=get_tokenizer().vocab_sha256))


BANK = bank_entry({1: [adapter_row("base", 0, 0), adapter_row("acme", 1, 2)],
                   2: [adapter_row("base", 0, 0), adapter_row("acme", 1, 2), adapter_row("zeta", 2, 3, 2)]})
MODELS = {"m": ENTRY, "ov": OPEN, "bank": BANK}


def adapter_classes(slot: int) -> tuple[str, ...]:
    return tuple(f"class {slot}.{i}" for i in range(3))


def fake_embeddings(seeds: np.ndarray) -> np.ndarray:
    """Unit vectors that depend on every value of each row (deterministic)."""
    rows = [np.random.default_rng(abs(hash(row.tobytes())) % 2**32).normal(size=EMBEDDING_DIM) for row in seeds]
    vectors = np.asarray(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


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
    """Answers like Triton would for a plain model "m" and an open-vocabulary model "ov"
    (with its text encoder): logits = mean pixel value per class offset; embeddings are
    deterministic unit vectors of the input. `models` may be replaced by a test."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.delay, self.fail = delay, fail
        self.models = dict(MODELS)
        self.batches: list[np.ndarray] = []
        self.token_batches: list[np.ndarray] = []
        self.texts_done = 0  # embed_texts calls that ran to the end

    async def lookup(self, name: str, version: int, *, text: bool = False, embeds: bool = False,
                     adapter: str = "") -> Route:
        if name not in self.models:
            raise NotFound(f"model {name!r} not found (models: {', '.join(sorted(self.models))})")
        return self.models[name].route(version, text=text, embeds=embeds, adapter=adapter)

    async def infer_images(self, route: Route, batch: np.ndarray, timeout_s: float,
                           output: str = contract.OUTPUT_NAME) -> tuple[np.ndarray, int]:
        self.batches.append(batch)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        if route.adapter is not None:  # a bank: the embedding depends on the image and the slot
            slots = np.full((len(batch), 1), route.adapter.slot, dtype=np.uint8)
            return fake_embeddings(np.concatenate([batch.reshape(len(batch), -1), slots], axis=1)), route.version
        if output == contract.EMBEDS_NAME:
            if route.vocabulary is None:
                raise AssertionError("image_embeds asked of a route without its text side")
            return fake_embeddings(batch.reshape(len(batch), -1)), route.version
        mean = batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)
        return mean + np.array([[0.0, 1.0, -1.0]], dtype=np.float32), route.version

    async def embed_texts(self, route: Route, tokens: np.ndarray, timeout_s: float) -> np.ndarray:
        assert tokens.dtype == np.int32 and tokens.shape[1] == contract.CONTEXT_LENGTH
        route.check_version(route.version)
        self.token_batches.append(tokens)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise self.fail
        self.texts_done += 1
        if route.adapter is not None:  # a bank's text encoder: the adapter's own tower
            return fake_embeddings(np.concatenate([tokens, np.full((len(tokens), 1), route.adapter.slot)], axis=1))
        return fake_embeddings(tokens)

    async def adapter_head(self, route: Route, timeout_s: float) -> AdapterHead:
        assert route.adapter is not None
        count = route.adapter.num_classes
        seeds = np.arange(count * 2, dtype=np.int64).reshape(count, 2) + 100 * route.adapter.slot
        return AdapterHead(fake_embeddings(seeds), adapter_classes(route.adapter.slot)[:count])

    async def refresh(self) -> dict[str, ModelEntry]:
        return dict(self.models)

    async def ready(self) -> bool:
        return self.fail is None


def service(triton: FakeTriton | None = None, **settings) -> ClassifierService:
    return ClassifierService(GatewaySettings(**settings), triton or FakeTriton(), GatewayMetrics(),
                             ThreadPoolExecutor(2))


def image_bytes(seed: int = 0) -> bytes:
    return encoded(make_image(40, 30, seed=seed), "JPEG")
