"""The moment between two loads of one publish: Triton's poll loads a bank and its adapter
table (or a model and its text encoder) one after the other, and a request arriving between
the two waits for the second instead of failing (`Triton.lookup`, `NotLoadedTogether`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cliplora.serve.gateway import triton as triton_module
from cliplora.serve.gateway.errors import NotLoadedTogether
from cliplora.serve.gateway.models import ModelEntry
from cliplora.serve.gateway.triton import Triton
from tests.fakes import adapter_row, bank_entry

ROWS = [adapter_row("base", 0, 0), adapter_row("acme", 1, 2)]


class RepositoryIndex:
    """Triton's repository index while `bank add` publishes version 2: the bank's version 2
    is ready at once (its version 1 gone), its table's version 2 after `table_after` reads."""

    def __init__(self, table_after: float) -> None:
        self.table_after, self.reads = table_after, 0

    async def get_model_repository_index(self, **_: Any) -> dict[str, Any]:
        await asyncio.sleep(0.01)  # a call over the network
        self.reads += 1
        tables = [1, 2] if self.reads > self.table_after else [1]
        return {"models": [{"name": "bank", "version": "2", "state": "READY"},
                           *({"name": "bank_adapters", "version": str(v), "state": "READY"} for v in tables)]}

    async def get_model_config(self, name: str, **_: Any) -> dict[str, Any]:
        return {"config": {"name": name}}

    async def close(self) -> None:
        pass


class TablesFromIndex:
    """Discovery in short: the bank's versions whose table is ready too."""

    async def describe(self, ready: dict[str, list[int]], configs: dict[str, Any]) -> dict[str, ModelEntry]:
        entry = bank_entry({v: ROWS for v in ready["bank"] if v in ready["bank_adapters"]} or {2: ROWS})
        if 2 not in ready["bank_adapters"]:  # the bank is there, its table at that version not yet
            entry.bank.tables.clear()
        return {"bank": entry}


def _triton(index: RepositoryIndex) -> Triton:
    triton = Triton("127.0.0.1:1")
    triton.client = index  # type: ignore[assignment]
    triton._discovery = TablesFromIndex()  # type: ignore[assignment]
    return triton


async def test_requests_between_the_two_loads_wait_for_the_table_and_share_the_reads(monkeypatch) -> None:
    monkeypatch.setattr(triton_module, "LOADS_POLL_S", 0.05)
    index = RepositoryIndex(table_after=4)
    triton = _triton(index)
    await triton.refresh()
    with pytest.raises(NotLoadedTogether):  # what the route alone says: there is no table to read yet
        triton.models["bank"].route(0, adapter="acme")
    routes = await asyncio.gather(*(triton.lookup("bank", 0, adapter="acme") for _ in range(20)))
    assert {(r.version, r.adapter.slot) for r in routes} == {(2, 1)}
    # 20 callers waited together: the repository was read a few times, not 20 per round.
    print(f"\n20 waiting callers: {index.reads} repository reads")
    assert 5 <= index.reads <= 12, index.reads


async def test_a_table_that_never_loads_is_unavailable_after_the_wait(monkeypatch) -> None:
    monkeypatch.setattr(triton_module, "LOADS_POLL_S", 0.05)
    monkeypatch.setattr(triton_module, "LOADS_WAIT_S", 0.4)
    index = RepositoryIndex(table_after=float("inf"))
    triton = _triton(index)
    with pytest.raises(NotLoadedTogether, match="no version of bank 'bank' has its adapter table ready"):
        await triton.lookup("bank", 0, adapter="acme")
    assert index.reads >= 4  # it looked again while it waited
