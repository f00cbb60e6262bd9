"""Prompt embeddings for request-time labels and ``Embed``: tokenize, ask the text encoder,
remember the answer.

A prompt goes through the project's torch-free tokenizer (`cliplora.core.tokenizer`,
identical to open_clip's ids) in the gateway's thread pool, then to the classifier's
text encoder ``<name>_text`` in Triton, pinned to the route's version; the unit
embeddings are kept in the bounded LRU cache (`cliplora.serve.gateway.text_cache`), so a
label set used again costs no text-encoder call. The tokenizer's vocabulary must be the
one the model was exported with (its sha256 is in the model's config), or the gateway
refuses rather than embed other token ids. The same tokenizer decides which labels are
alike (`cliplora.core.open_vocab.check_distinct`): the rule the export applies to its
class names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cliplora.core import contract, open_vocab
from cliplora.core.errors import CliploraError, DeadlineExceeded, FailedPrecondition
from cliplora.core.tokenizer import ClipTokenizer, get_tokenizer
from cliplora.serve.gateway.backend import TritonBackend
from cliplora.serve.gateway.metrics import GatewayMetrics
from cliplora.serve.gateway.models import OpenVocabulary, Route
from cliplora.serve.gateway.text_cache import TextEmbeddingCache

log = logging.getLogger(__name__)


class TextEncoder:
    def __init__(self, triton: TritonBackend, metrics: GatewayMetrics, pool: ThreadPoolExecutor,
                 cache_entries: int) -> None:
        self.triton = triton
        self.metrics = metrics
        self.pool = pool
        self.cache = TextEmbeddingCache(
            cache_entries,
            on_hits=lambda model, n: metrics.text_cache_hits.labels(model).inc(n),
            on_misses=lambda model, n: metrics.text_cache_misses.labels(model).inc(n),
            on_size=metrics.text_cache_entries.set,
        )
        self._tokenizer: ClipTokenizer | None = None

    async def tokenizer_for(self, route: Route) -> ClipTokenizer:
        """The gateway's tokenizer (loaded once, in the pool: reading the vocabulary takes a
        tenth of a second), checked against the vocabulary the model expects."""
        vocabulary = _text_side(route)
        if self._tokenizer is None:
            try:
                self._tokenizer = await asyncio.get_running_loop().run_in_executor(self.pool, get_tokenizer)
            except CliploraError as exc:
                raise FailedPrecondition(f"the gateway cannot tokenize text for {route.entry.name!r}: {exc}") from None
        open_vocab.check_vocabulary(route.entry.name, vocabulary.vocab_sha256, self._tokenizer.vocab_sha256)
        return self._tokenizer

    async def check_distinct(self, route: Route, labels: Sequence[str]) -> None:
        """InvalidArgument when two labels read alike to this model's tokenizer."""
        tokenizer = await self.tokenizer_for(route)
        await asyncio.get_running_loop().run_in_executor(self.pool, open_vocab.check_distinct, labels, tokenizer.encode)

    async def embed(self, route: Route, prompts: Sequence[str], deadline: float) -> np.ndarray:
        """[len(prompts), D] unit embeddings of `prompts` as given (no template), from the
        cache or from the route's text encoder at the route's version."""
        text = _text_side(route).text
        tokenizer = await self.tokenizer_for(route)
        loop = asyncio.get_running_loop()

        async def compute(missing: list[str]) -> np.ndarray:
            tokens = await loop.run_in_executor(self.pool, tokenizer, missing, contract.CONTEXT_LENGTH)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("deadline exceeded before the text encoder ran")
            started = time.perf_counter()
            try:
                return await self.triton.embed_texts(route, tokens, remaining)
            finally:
                self.metrics.triton.labels(text.name).observe(time.perf_counter() - started)

        return await self.cache.embed(text.name, route.text_scope, prompts, compute, metric_model=route.entry.name)


def _text_side(route: Route) -> OpenVocabulary:
    if route.vocabulary is None:
        raise ValueError(f"the route of {route.entry.name} has no text side: look it up with text=True")
    return route.vocabulary
