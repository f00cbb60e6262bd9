"""The gateway's HTTP door as a load-test target: JSON ``POST /v1/classify`` for the
``http:ENTRY`` entries of `cliplora loadtest` (`cliplora.loadtest.entries`).

Each entry asks what its gRPC twin asks (`cliplora.loadtest.targets.GatewayTarget`): the
same model, adapter, labels and templates, ``top_k`` 5, the same rotating batches of the
same images, the same deadline (as the door's ``Request-Timeout`` header) and the same
bearer token (``CLIPLORA_TOKEN``). What the client does per request is kept small, as it
shares the machine with the server: every image is base64-encoded once before the clock
starts, and the JSON body of every request that is the same each time is written once too;
only ``:labels-cold`` and ``NAME@*`` entries, whose requests differ each time, write theirs
per request. One aiohttp session serves the run, its connection pool as large as the
closed loop's concurrency (unbounded in an open loop, where requests pile up as they would
on gRPC's one multiplexed connection). Plain HTTP, as the gRPC target's channel is
unencrypted. A failed request is counted under the gRPC status name of the door's error
JSON (the names gRPC errors are counted under), or ``HTTP_<status>`` without one.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from typing import Any

import aiohttp

from cliplora.core.client import TOKEN_ENV, token_metadata
from cliplora.core.errors import InvalidArgument, NotFound
from cliplora.loadtest.entries import HTTP, AdapterChooser, Entry, bank_chooser, cold_labels
from cliplora.loadtest.targets import RequestFailed, entry_turn, rotating_batches

CLASSIFY_PATH = "/v1/classify"
MODELS_PATH = "/v1/models"
JSON_TYPE = "application/json"


def parse_address(address: str) -> str:
    """``HOST:PORT`` -> the door's base URL, ``http://HOST:PORT``; InvalidArgument naming
    what is wrong otherwise (a scheme, no port)."""
    host, colon, port = address.rpartition(":")
    if "://" in address or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"--http-target must be HOST:PORT (e.g. 127.0.0.1:8080), got {address!r}")
    return f"http://{address}"


class HttpTarget:
    """`Target` for the ``http:`` entries: JSON ``POST /v1/classify`` on the HTTP door at
    `address` (``HOST:PORT``). `connections`: the connection pool's size (None: unbounded)."""

    def __init__(self, address: str, images: list[bytes], *, entries: dict[str, Entry], batch: int = 1,
                 timeout_s: float = 60.0, top_k: int = 5, connections: int | None = None,
                 adapter_skew: float | None = None, seed: int = 0) -> None:
        self.url = parse_address(address)
        self.batch, self.timeout_s, self.top_k, self.connections = batch, timeout_s, top_k, connections
        self.entries, self.adapter_skew, self.seed = entries, adapter_skew, seed
        self.description = f"HTTP door {address} (JSON, base64 images)"
        self._images = [base64.b64encode(data).decode("ascii") for data in images]  # once, before the clock
        self._stride = 1
        self._bodies: dict[str, list[bytes]] = {}  # fixed requests, serialized once
        self._shapes: dict[str, list[dict[str, Any]]] = {}  # requests written per request (cold, @*)
        self._choosers: dict[str, tuple[AdapterChooser, Iterator[int]]] = {}
        self.session: aiohttp.ClientSession | None = None  # opened by start()

    async def start(self, models: list[str]) -> None:
        """Open the session, check that the door serves every ``http:`` entry's model (and
        its bank's adapters for ``NAME@*``), and write the entries' requests."""
        self.session = aiohttp.ClientSession(
            self.url, connector=aiohttp.TCPConnector(limit=self.connections or 0),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=dict(token_metadata()))
        try:
            served = await self._served()
            self._stride = len(models)
            for name in models:
                entry = self.entries.get(name) or Entry(name, name)
                if entry.door == HTTP:
                    self._prepare(entry, served)
        except BaseException:
            await self.session.close()
            raise

    async def _served(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/models``: the door's models by name."""
        async with self.session.get(MODELS_PATH) as response:
            if response.status != 200:
                raise RequestFailed(await _error_code(response), f"GET {MODELS_PATH} answered {response.status}"
                                    + (f" (is {TOKEN_ENV} set?)" if response.status == 401 else ""))
            listing = await response.json()
        return {model["id"]: model for model in listing["data"]}

    def _prepare(self, entry: Entry, served: dict[str, dict[str, Any]]) -> None:
        info = served.get(entry.model)
        if info is None:
            raise NotFound(f"--models entry {entry.name!r}: the HTTP door serves no model {entry.model!r} "
                           f"(it serves {', '.join(sorted(served)) or 'none'})")
        requests = [self._request(entry, chosen) for chosen in rotating_batches(self._images, self.batch)]
        if entry.every_adapter:
            chooser = bank_chooser(entry, info.get("kind", ""), (a["id"] for a in info.get("adapters", [])),
                                   self.adapter_skew, self.seed, "the door")
            self._choosers[entry.name] = (chooser, itertools.count())
        if entry.cold or entry.every_adapter:
            self._shapes[entry.name] = requests
        else:
            self._bodies[entry.name] = [json.dumps(request).encode() for request in requests]

    def _request(self, entry: Entry, chosen: list[str]) -> dict[str, Any]:
        """The JSON request of `entry` for one batch of base64 images: only the fields the
        entry sets, as the door's defaults are gRPC's."""
        request: dict[str, Any] = {"model": entry.model, "images": [{"b64": data} for data in chosen],
                                   "top_k": self.top_k}
        if entry.adapter and not entry.every_adapter:
            request["adapter"] = entry.adapter
        if entry.labels:
            request["labels"] = list(entry.labels)
        if entry.templates:
            request["templates"] = list(entry.templates)
        return request

    def _body(self, name: str, item: int) -> bytes:
        """Request `item`'s body for entry `name`: the one written at start, or, for a cold or
        ``NAME@*`` entry, one written now (fresh labels; the chooser's next adapter)."""
        turn = entry_turn(item, self._stride)
        if name in self._bodies:
            bodies = self._bodies[name]
            return bodies[turn % len(bodies)]
        shapes = self._shapes[name]
        request = dict(shapes[turn % len(shapes)])
        entry = self.entries[name]
        if entry.cold:  # labels no call has used before, as the gRPC target writes them
            request["labels"] = cold_labels(entry.labels, item)
        if entry.every_adapter:
            chooser, count = self._choosers[name]
            request["adapter"] = chooser(next(count))
        return json.dumps(request).encode()

    async def send(self, model: str, item: int) -> None:
        headers = {"Content-Type": JSON_TYPE, "Request-Timeout": f"{self.timeout_s:g}"}
        try:
            async with self.session.post(CLASSIFY_PATH, data=self._body(model, item), headers=headers) as response:
                if response.status != 200:
                    raise RequestFailed(await _error_code(response), f"HTTP {response.status}")
                answer = await response.read()
        except TimeoutError:  # past the deadline: the runner counts DEADLINE_EXCEEDED, as for gRPC
            raise
        except aiohttp.ClientError as exc:  # refused, reset (what gRPC calls UNAVAILABLE), a cut body
            code = "UNAVAILABLE" if isinstance(exc, aiohttp.ClientConnectionError) else type(exc).__name__
            raise RequestFailed(code, str(exc)) from None
        _check_answer(answer, self.batch)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


async def _error_code(response: aiohttp.ClientResponse) -> str:
    """The gRPC status name in the door's error JSON, or ``HTTP_<status>`` when the body
    has none (a proxy's page, an empty body)."""
    try:
        code = json.loads(await response.read())["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return code if isinstance(code, str) and code else f"HTTP_{response.status}"


def _check_answer(answer: bytes, batch: int) -> None:
    """A 200 counts only with one ranked answer per image: a JSON list `batch` long."""
    try:
        ranked = json.loads(answer)
    except ValueError:
        ranked = None
    if not isinstance(ranked, list) or len(ranked) != batch:
        raise RequestFailed("BAD_ANSWER", f"expected a JSON list of {batch} answers, got {answer[:80]!r}")
