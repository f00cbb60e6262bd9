"""Prometheus' HTTP API, read: instant queries (`query`), and the adapters of a bank with
the most requests per second (`top_adapters`, `cliplora bank top`).

The load test's server-side figures (`cliplora.loadtest.prom`) use `query` too. Standard
library only: the command line runs it where nothing else is installed.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from cliplora.core import contract
from cliplora.core.errors import InvalidArgument, Unavailable
from cliplora.core.repository import validate_model_name

DEFAULT_TIMEOUT_S = 10.0
# The gateway's per-adapter counter (serve/gateway/metrics.py); its series are bounded per
# bank (`--adapter-series`, the heaviest hitters: serve/gateway/adapter_traffic.py).
ADAPTER_REQUESTS = "cliplora_gateway_adapter_requests_total"
DEFAULT_WINDOW = "5m"
DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
_DURATION = re.compile(r"([0-9]+(ms|s|m|h|d|w|y))+")  # Prometheus' duration syntax: 5m, 1h30m, 90s


def query(url: str, promql: str, at: float | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict[str, Any]]:
    """The result of an instant query (at `at`, Unix seconds; None: now).

    Unavailable, naming `url`, when Prometheus does not answer or answers 5xx;
    InvalidArgument when it refuses the query (4xx: the PromQL or a parameter)."""
    params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
    address = f"{url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(address, timeout=timeout_s) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = _error_of(exc)
        if exc.code < 500:
            raise InvalidArgument(f"Prometheus at {url} refused the query {promql!r}: {detail}") from None
        raise Unavailable(f"Prometheus at {url} failed the query {promql!r}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unavailable(f"Prometheus at {url} did not answer: {exc}") from None
    if not isinstance(body, dict) or body.get("status") != "success" or not isinstance(body.get("data"), dict):
        raise Unavailable(f"Prometheus at {url} did not answer the query {promql!r} as Prometheus does: "
                          f"{str(body)[:200]}")
    return list(body["data"].get("result") or [])


def _error_of(exc: urllib.error.HTTPError) -> str:
    """Prometheus' own error text in an error answer, else the HTTP status."""
    try:
        body = json.loads(exc.read())
        return f"{body.get('errorType', '')}: {body['error']}"
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return f"HTTP {exc.code} {exc.reason}"


@dataclass(frozen=True)
class AdapterRate:
    adapter: str
    requests_per_second: float

    def to_json(self) -> dict[str, object]:
        return {"adapter": self.adapter, "requests_per_second": self.requests_per_second}


def top_adapters_query(bank: str, window: str = DEFAULT_WINDOW, limit: int = DEFAULT_LIMIT) -> str:
    """The PromQL `cliplora bank top` asks: the bank's `limit` adapters with the highest
    request rate over `window`, summed over every gateway. The base is left out: it is
    not an adapter one can promote."""
    validate_model_name(bank)
    if not _DURATION.fullmatch(window):
        raise InvalidArgument(f"--window must be a Prometheus duration such as 5m, 1h or 90s, got {window!r}")
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"--limit must be 1..{MAX_LIMIT}, got {limit}")
    selector = f'{ADAPTER_REQUESTS}{{model="{bank}",adapter!="{contract.BASE_ADAPTER}"}}'
    return f"topk({limit}, sum by (adapter) (rate({selector}[{window}])))"


def top_adapters(url: str, bank: str, window: str = DEFAULT_WINDOW, limit: int = DEFAULT_LIMIT,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> list[AdapterRate]:
    """The adapters of `bank` with the most requests per second, highest first (ties by id)."""
    found = []
    for row in query(url, top_adapters_query(bank, window, limit), timeout_s=timeout_s):
        try:
            adapter, rate = str(row["metric"]["adapter"]), float(row["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise Unavailable(f"Prometheus at {url} answered a row that is not an adapter's rate: {row!r}") from None
        if math.isfinite(rate):
            found.append(AdapterRate(adapter, rate))
    return sorted(found, key=lambda r: (-r.requests_per_second, r.adapter))[:limit]
