"""`cliplora loadtest --models` entries for banks (NAME@ID, NAME@*) and how NAME@* picks
its adapters: round robin over all of them, or Zipf-distributed with --adapter-skew; the
door each entry goes through (``http:ENTRY``: the HTTP door)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cliplora.core.errors import InvalidArgument
from cliplora.loadtest.entries import (
    GRPC,
    HTTP,
    AdapterChooser,
    parse_entry,
    parse_skew,
    wants_labels,
)


def test_entries_say_what_they_ask() -> None:
    assert parse_entry("shop").model == "shop" and parse_entry("shop").adapter == ""
    assert parse_entry("shop@acme").adapter == "acme" and parse_entry("shop@acme").model == "shop"
    assert parse_entry("shop@*").every_adapter and not parse_entry("shop@acme").every_adapter
    assert parse_entry("pets:labels-cold").cold and parse_entry("pets:labels-cold").model == "pets"
    labelled = parse_entry("shop@acme:labels")
    assert (labelled.model, labelled.adapter, labelled.cold) == ("shop", "acme", False)


@pytest.mark.parametrize(("text", "door", "model", "adapter", "cold", "labels"), [
    ("shop", GRPC, "shop", "", False, False),
    ("http:shop", HTTP, "shop", "", False, False),
    ("http:shop@acme", HTTP, "shop", "acme", False, False),
    ("http:shop@*", HTTP, "shop", "*", False, False),
    ("http:pets:labels-cold", HTTP, "pets", "", True, True),
    ("http:shop@acme:labels", HTTP, "shop", "acme", False, True),
    ("http:labels", GRPC, "http", "", False, True),  # a model called http: its labels entry, as before
    ("http:http", HTTP, "http", "", False, False),
])
def test_entries_say_which_door(text: str, door: str, model: str, adapter: str, cold: bool, labels: bool) -> None:
    entry = parse_entry(text)
    assert (entry.door, entry.model, entry.adapter, entry.cold, entry.name) == (door, model, adapter, cold, text)
    assert wants_labels(text) is labels


@pytest.mark.parametrize(("text", "says"), [
    ("shop@", "invalid adapter id"), ("shop@../x", "invalid adapter id"), ("sh/op@a", "invalid model name"),
    ("shop:labels@a", "after ':' comes labels"), ("shop:cold", "after ':' comes labels"),
    ("http:", "invalid model name ''"), ("https:shop", "before the name, http: for the HTTP door"),
    ("http:http:shop", "after ':' comes labels"), ("grpc:shop", "after ':' comes labels"),
])
def test_bad_entries_are_refused(text: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        parse_entry(text)


def test_round_robin_asks_every_adapter_in_turn() -> None:
    chooser = AdapterChooser(["a", "b", "c"])
    assert [chooser(i) for i in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_zipf_draws_follow_one_over_k_to_the_s() -> None:
    adapters = [f"a{k}" for k in range(1, 17)]
    chooser = AdapterChooser(adapters, skew=1.1, seed=3)
    counts = Counter(chooser(i) for i in range(40_000))
    weights = 1 / np.arange(1, 17) ** 1.1
    expected = 40_000 * weights / weights.sum()
    got = np.array([counts[a] for a in adapters])
    assert np.all(np.abs(got - expected) < 5 * np.sqrt(expected) + 5), (got, expected.round())
    assert [chooser(i) for i in range(50)] == [AdapterChooser(adapters, 1.1, seed=3)(i) for i in range(50)]
    assert [chooser(i) for i in range(50)] != [AdapterChooser(adapters, 1.1, seed=4)(i) for i in range(50)]


@pytest.mark.parametrize("text", ["zipf", "zipf:0", "zipf:-1", "uniform:1", "zipf:x"])
def test_bad_skews_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="zipf:S with S > 0"):
        parse_skew(text)
    assert parse_skew("zipf:1.1") == 1.1 and parse_skew(None) is None


def test_a_bank_without_adapters_has_nothing_to_spread_over() -> None:
    with pytest.raises(InvalidArgument, match="at least one adapter besides its base"):
        AdapterChooser([])


def test_server_side_figures_go_under_each_entry_of_their_model() -> None:
    from cliplora.loadtest.cli import per_entry

    entries = {text: parse_entry(text) for text in ("base", "shop@*", "shop@acme", "gone")}
    server = {"window_seconds": 60, "gateway": {"base": {"p50_ms": 10.0}, "shop": {"p50_ms": 12.0}},
              "triton": {"shop": {"inferences": 5.0}}}
    keyed = per_entry(server, entries)
    assert keyed["gateway"] == {"base": {"p50_ms": 10.0}, "shop@*": {"p50_ms": 12.0}, "shop@acme": {"p50_ms": 12.0}}
    assert keyed["triton"] == {"shop@*": {"inferences": 5.0}, "shop@acme": {"inferences": 5.0}}
    assert keyed["window_seconds"] == 60
