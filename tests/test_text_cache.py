"""The gateway's prompt-embedding cache on its own: concurrent callers share one
computation, a failed computation does not fail the callers that were waiting on it,
entries do not keep their batch alive, and the bound holds."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cliplora.core.errors import DeadlineExceeded
from cliplora.serve.gateway.text_cache import TextEmbeddingCache


def _rows(prompts: list[str]) -> np.ndarray:
    return np.array([[float(len(p)), float(sum(map(ord, p)))] for p in prompts], dtype=np.float32)


class Encoder:
    """Counts what it is asked to compute; can be made slow or to fail."""

    def __init__(self, delay_s: float = 0.0, fail: BaseException | None = None) -> None:
        self.delay_s, self.fail, self.asked = delay_s, fail, []

    async def __call__(self, prompts: list[str]) -> np.ndarray:
        self.asked.append(list(prompts))
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return _rows(prompts)


async def test_concurrent_callers_compute_a_prompt_once() -> None:
    cache, encoder = TextEmbeddingCache(10), Encoder(delay_s=0.05)
    first, second = await asyncio.gather(cache.embed("t", 1, ["a", "b"], encoder),
                                         cache.embed("t", 1, ["b", "c"], encoder))
    assert encoder.asked == [["a", "b"], ["c"]]  # "b" was pending: the second call waited for it
    np.testing.assert_array_equal(first, _rows(["a", "b"]))
    np.testing.assert_array_equal(second, _rows(["b", "c"]))
    again = await cache.embed("t", 1, ["c", "a", "a"], encoder)
    assert len(encoder.asked) == 2 and again.shape == (3, 2)  # all cached; repeats kept
    assert len(await cache.embed("t", 2, ["a"], encoder)) == 1 and encoder.asked[-1] == ["a"]  # another version


@pytest.mark.parametrize("failure", ["cancelled", "deadline"])
async def test_a_waiter_does_not_inherit_another_calls_failure(failure: str) -> None:
    """The first caller is cancelled (its client went away) or runs out of its own time;
    the caller waiting on its prompts computes them itself and succeeds."""
    cache = TextEmbeddingCache(10)
    slow = Encoder(delay_s=0.2, fail=DeadlineExceeded("the first call's deadline") if failure == "deadline" else None)
    healthy = Encoder()
    first = asyncio.ensure_future(cache.embed("t", 1, ["x", "y"], slow))
    await asyncio.sleep(0.05)  # "x" and "y" are pending now
    second = asyncio.ensure_future(cache.embed("t", 1, ["y", "z"], healthy))
    await asyncio.sleep(0.05)
    if failure == "cancelled":
        first.cancel()
    with pytest.raises(asyncio.CancelledError if failure == "cancelled" else DeadlineExceeded):
        await first
    np.testing.assert_array_equal(await second, _rows(["y", "z"]))
    assert healthy.asked == [["z"], ["y"]]  # its own prompt first, then the one it had waited for


async def test_entries_are_copies_and_the_bound_holds() -> None:
    sizes: list[int] = []
    cache = TextEmbeddingCache(3, on_size=sizes.append)
    await cache.embed("t", 1, [f"p{i}" for i in range(100)], Encoder())
    assert len(cache) == 3 and sizes[-1] == 3
    for row in cache._entries.values():
        assert row.base is None and row.nbytes == 2 * 4  # not a view of the 100-row batch
    none = TextEmbeddingCache(0)
    encoder = Encoder()
    await none.embed("t", 1, ["a"], encoder)
    await none.embed("t", 1, ["a"], encoder)
    assert len(none) == 0 and encoder.asked == [["a"], ["a"]]  # capacity 0: always the encoder
