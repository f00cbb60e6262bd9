"""What the gateway asks of Triton, declared once.

`cliplora.serve.gateway.triton.Triton` implements it against a real Triton; the tests'
stand-in (tests/fakes.py) implements it too, and tests/test_gateway_unit.py checks that
both match this declaration member by member, so the stand-in cannot drift from what the
handlers call.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cliplora.core import contract
from cliplora.serve.gateway.models import AdapterHead, ModelEntry, Route


class TritonBackend(Protocol):
    async def lookup(self, name: str, version: int, *, text: bool = False, embeds: bool = False,
                     adapter: str = "") -> Route:
        """The route of a request for `version` (0: latest) of model `name` that needs the
        text side (`text`) or image embeddings (`embeds`); for a bank, `adapter`'s row (empty:
        the base). NotFound, Unavailable, InvalidArgument or FailedPrecondition otherwise."""
        ...

    async def infer_images(self, route: Route, batch: np.ndarray, timeout_s: float,
                           output: str = contract.OUTPUT_NAME) -> tuple[np.ndarray, int]:
        """(`output` for each image of the uint8 batch, the version that answered)."""
        ...

    async def embed_texts(self, route: Route, tokens: np.ndarray, timeout_s: float) -> np.ndarray:
        """[N, D] unit text embeddings of INT32 token rows, at the route's version."""
        ...

    async def adapter_head(self, route: Route, timeout_s: float) -> AdapterHead:
        """A bank adapter's class embeddings and names, at the route's version."""
        ...

    async def refresh(self) -> dict[str, ModelEntry]:
        """The models served now, read again from Triton (the old view if Triton is down)."""
        ...

    async def ready(self) -> bool:
        """True while Triton answers ready."""
        ...
