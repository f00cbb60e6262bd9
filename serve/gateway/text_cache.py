"""A bounded LRU cache of prompt embeddings, for request-time labels.

Keyed by (text encoder, scope, prompt), the scope being the model version for a
classifier's text encoder (a new version never reuses an old version's embeddings) and
the adapter's content hash for a bank's (`Route.text_scope`). Prompts that several calls need at the same moment are computed
once: the later callers wait for the first one's result instead of asking Triton again.
If that first computation fails (its caller was cancelled, its own deadline passed, its
image was bad and its text side was dropped), the waiters do not inherit its error: they
compute those prompts themselves, under their own deadline. Each entry is a copy of its
row (a view would keep the whole batch it came from alive). With ``capacity`` 0 nothing
is kept (every prompt is a miss), which is useful to measure the cold path. Lives on the
event loop only (no locks needed).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

Scope = int | str  # a classifier's model version, or a bank adapter's content
Key = tuple[str, Scope, str]  # (text model, scope, prompt)
Compute = Callable[[list[str]], Awaitable[np.ndarray]]  # prompts -> [len, D] unit embeddings


class TextEmbeddingCache:
    def __init__(self, capacity: int, *, on_hits: Callable[[str, int], None] = lambda model, n: None,
                 on_misses: Callable[[str, int], None] = lambda model, n: None,
                 on_size: Callable[[int], None] = lambda size: None) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must not be negative, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._pending: dict[Key, asyncio.Future[np.ndarray]] = {}
        self._on_hits, self._on_misses, self._on_size = on_hits, on_misses, on_size

    def __len__(self) -> int:
        return len(self._entries)

    async def embed(self, model: str, scope: Scope, prompts: Sequence[str], compute: Compute,
                    metric_model: str | None = None) -> np.ndarray:
        """[len(prompts), D] embeddings: cached ones, pending ones awaited, the rest computed
        in one `compute` call. `metric_model` names the model in the hit/miss counters."""
        found, waiting, missing = self._look_up(model, scope, prompts)
        label = metric_model or model
        self._on_hits(label, len(found) + len(waiting))
        self._on_misses(label, len(missing))
        if missing:
            found.update(await self._compute(model, scope, missing, compute))
        orphans = []
        for prompt, future in waiting.items():
            try:
                found[prompt] = await asyncio.shield(future)
            except Exception:  # another call's failure, not ours: compute it ourselves
                orphans.append(prompt)
        if orphans:
            rows = await self.embed(model, scope, orphans, compute, metric_model)
            found.update(zip(orphans, rows, strict=True))
        return np.stack([found[prompt] for prompt in prompts])

    def _look_up(self, model: str, scope: Scope, prompts: Sequence[str]) -> tuple[
            dict[str, np.ndarray], dict[str, asyncio.Future[np.ndarray]], list[str]]:
        """Each distinct prompt once, in order: (cached rows, others' pending computations,
        the prompts nobody has)."""
        found: dict[str, np.ndarray] = {}
        waiting: dict[str, asyncio.Future[np.ndarray]] = {}
        missing: list[str] = []
        for prompt in dict.fromkeys(prompts):
            key = (model, scope, prompt)
            if key in self._entries:
                self._entries.move_to_end(key)
                found[prompt] = self._entries[key]
            elif key in self._pending:
                waiting[prompt] = self._pending[key]
            else:
                missing.append(prompt)
        return found, waiting, missing

    async def _compute(self, model: str, scope: Scope, missing: list[str], compute: Compute) -> dict[str, np.ndarray]:
        """`missing` computed in one call, announced as pending meanwhile so that other calls
        wait for it; on failure the waiters hear of it (and compute for themselves)."""
        loop = asyncio.get_running_loop()
        mine = {prompt: loop.create_future() for prompt in missing}
        for prompt, future in mine.items():
            self._pending[(model, scope, prompt)] = future
        try:
            computed = await compute(missing)
            if computed.shape[0] != len(missing):
                raise RuntimeError(f"{computed.shape[0]} embeddings for {len(missing)} prompts")
            for prompt, row in zip(missing, computed, strict=True):
                mine[prompt].set_result(row)
                self._store((model, scope, prompt), row)
            return dict(zip(missing, computed, strict=True))
        except BaseException as exc:
            for future in mine.values():
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
                    future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            for prompt in missing:
                self._pending.pop((model, scope, prompt), None)

    def _store(self, key: Key, row: np.ndarray) -> None:
        if not self.capacity:
            return
        self._entries[key] = np.array(row, dtype=np.float32, copy=True)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        self._on_size(len(self._entries))
