"""The ``--models`` entries of `cliplora loadtest`: what each entry's requests ask for.

- ``NAME``: model NAME (its own classes, or a bank's base);
- ``NAME:labels`` / ``NAME:labels-cold``: the ``--labels-file`` labels as request-time
  labels, the same ones every time (warm text cache) or with a fresh suffix each request
  (every prompt a cache miss);
- ``NAME@ID``: adapter ID of bank NAME (``NAME@ID:labels``, ``NAME@ID:labels-cold``: with
  request-time labels, a bank created with ``--open-vocabulary``);
- ``NAME@*``: every adapter of bank NAME (its base aside), the next one for each request
  (round robin), or drawn from a Zipf distribution over them with
  ``--adapter-skew zipf:S`` (the first adapter the most often: P(k) ∝ 1 / k^S);
- ``http:ENTRY``: any of the above through the HTTP door's JSON ``POST /v1/classify``
  (``--http-target``) instead of gRPC (``--target``), e.g. ``--models base,http:base``
  for one model through both doors. (``http:labels`` and ``http:labels-cold`` keep their
  meaning: the labels entries of a model called ``http``.)

Entries are interleaved request by request, whatever they ask and whichever door they use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cliplora.core import contract
from cliplora.core.errors import InvalidArgument
from cliplora.core.repository import validate_adapter_id, validate_model_name

LABEL_VARIANTS = ("labels", "labels-cold")
EVERY_ADAPTER = "*"
GRPC, HTTP = "grpc", "http"  # the doors: the gateway's gRPC API, its HTTP JSON door
HTTP_PREFIX = f"{HTTP}:"


@dataclass(frozen=True)
class Entry:
    name: str  # as written in --models: the report's key
    model: str
    labels: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    cold: bool = False
    adapter: str = ""  # NAME@ID; EVERY_ADAPTER for NAME@*
    door: str = GRPC  # HTTP for http:ENTRY

    @property
    def every_adapter(self) -> bool:
        return self.adapter == EVERY_ADAPTER


def split_door(text: str) -> tuple[str, str]:
    """(door, the entry without its ``http:``): ``http:base`` -> (HTTP, ``base``). The labels
    entries of a model called ``http`` (``http:labels``, ``http:labels-cold``) stay gRPC's."""
    rest = text.removeprefix(HTTP_PREFIX)
    if rest != text and rest not in LABEL_VARIANTS:
        return HTTP, rest
    return GRPC, text


def parse_entry(text: str) -> Entry:
    """One entry's door, model and what it asks (labels come later, from the labels file)."""
    door, rest = split_door(text)
    name, colon, variant = rest.partition(":")
    model, at, adapter = name.partition("@")
    validate_model_name(model)
    if colon and variant not in LABEL_VARIANTS:
        raise InvalidArgument(f"--models entry {text!r}: after ':' comes labels or labels-cold "
                              f"(before the name, {HTTP_PREFIX} for the HTTP door)")
    if at and adapter != EVERY_ADAPTER:
        validate_adapter_id(adapter)
    return Entry(text, model, cold=variant == "labels-cold", adapter=adapter if at else "", door=door)


def wants_labels(text: str) -> bool:
    """Whether entry `text` asks for request-time labels (``:labels``, ``:labels-cold``)."""
    return ":" in split_door(text)[1]


@dataclass
class AdapterChooser:
    """Which adapter of a ``NAME@*`` entry request `item` asks for: round robin over
    `adapters`, or a seeded Zipf(`skew`) draw (the same sequence for the same seed)."""

    adapters: list[str]
    skew: float | None = None
    seed: int = 0
    _draws: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.adapters:
            raise InvalidArgument("an @* entry needs a bank with at least one adapter besides its base")
        if self.skew is not None:
            weights = 1.0 / np.arange(1, len(self.adapters) + 1, dtype=np.float64) ** self.skew
            rng = np.random.default_rng(self.seed)
            self._draws = rng.choice(len(self.adapters), size=1 << 16, p=weights / weights.sum())

    def __call__(self, item: int) -> str:
        if self.skew is None:
            return self.adapters[item % len(self.adapters)]
        return self.adapters[int(self._draws[item % len(self._draws)])]


def bank_chooser(entry: Entry, kind: str, adapter_ids: Iterable[str], skew: float | None, seed: int,
                 server: str) -> AdapterChooser:
    """The chooser of ``NAME@*`` entry `entry` over its bank's adapters but the base, from
    what `server` lists of the model (its `kind`, its adapters' ids); InvalidArgument when
    `server` does not serve it as a bank. Both doors' targets ask it the same way."""
    if kind != contract.KIND_BANK:
        raise InvalidArgument(f"--models entry {entry.name!r}: {entry.model!r} is not a bank {server} serves")
    return AdapterChooser([a for a in adapter_ids if a != contract.BASE_ADAPTER], skew, seed=seed)


def cold_labels(labels: Sequence[str], item: int) -> list[str]:
    """``:labels-cold``: labels no call has used before (request `item`'s number added), so
    every prompt misses the gateway's text cache; both doors write them the same way."""
    return [f"{label} {item}" for label in labels]


def parse_skew(text: str | None) -> float | None:
    """``--adapter-skew zipf:S`` (S > 0) -> S; None (round robin) when not given."""
    if text is None:
        return None
    kind, _, value = text.partition(":")
    try:
        skew = float(value)
    except ValueError:
        skew = float("nan")
    if kind != "zipf" or not skew > 0:
        raise InvalidArgument(f"--adapter-skew must be zipf:S with S > 0 (e.g. zipf:1.1), got {text!r}")
    return skew
