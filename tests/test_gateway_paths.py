"""The gateway's request path against the stand-in for Triton: the route one lookup gives,
the open-vocabulary rules (vocabulary, budget, templates, readiness, pinning, alike
labels), the chunking of large calls, and the stand-in itself checked against the
declaration of what the gateway needs of Triton."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import replace

import numpy as np
import pytest

from cliplora.core import contract
from cliplora.serve.gateway.backend import TritonBackend
from cliplora.serve.gateway.models import ModelEntry, TextEntry
from cliplora.serve.gateway.triton import CHUNKS_IN_FLIGHT, Triton
from cliplora.v1 import classifier_pb2 as pb
from tests.fakes import OPEN, Aborted, FakeContext, FakeTriton, image_bytes, service

# -- the declaration and what implements it -----------------------------------------------------


def mismatches(implementation: type, protocol: type) -> list[str]:
    """How `implementation` differs from `protocol`, member by member: a missing member, a
    coroutine against a plain function, or other parameters (names, kinds, defaults)."""
    found = []
    for name, declared in inspect.getmembers(protocol, inspect.isfunction):
        if name.startswith("_"):
            continue
        given = getattr(implementation, name, None)
        if given is None:
            found.append(f"{name}: missing")
            continue
        if inspect.iscoroutinefunction(declared) != inspect.iscoroutinefunction(given):
            found.append(f"{name}: async in one, not in the other")
        want = [(p.name, p.kind, p.default) for p in inspect.signature(declared).parameters.values()]
        have = [(p.name, p.kind, p.default) for p in inspect.signature(given).parameters.values()]
        if want != have:
            found.append(f"{name}: parameters {have} instead of {want}")
    return found


@pytest.mark.parametrize("implementation", [Triton, FakeTriton])
def test_triton_and_its_stand_in_match_the_declaration(implementation: type) -> None:
    assert mismatches(implementation, TritonBackend) == []


def test_the_declaration_check_sees_a_drifted_stand_in() -> None:
    class Drifted(FakeTriton):
        async def lookup(self, name: str, version: int, text: bool = False):  # keyword-only lost
            raise NotImplementedError

        def refresh(self):  # no longer a coroutine
            raise NotImplementedError

    found = mismatches(Drifted, TritonBackend)
    assert any(f.startswith("lookup: parameters") for f in found), found
    assert "refresh: async in one, not in the other" in found, found


# -- open vocabulary on the request path ------------------------------------------------------


def _labels_request(labels: list[str], templates: list[str] | None = None, version: int = 0) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model="ov", version=version, images=[pb.Image(encoded=image_bytes())], top_k=0,
                              labels=labels, templates=templates or [])


async def _refused(triton: FakeTriton, request: pb.ClassifyRequest, **settings) -> Aborted:
    with pytest.raises(Aborted) as caught:
        await service(triton, **settings).Classify(request, FakeContext())
    return caught.value


def _with_model(entry: ModelEntry) -> FakeTriton:
    triton = FakeTriton()
    triton.models[entry.name] = entry
    return triton


async def test_a_text_encoder_of_another_vocabulary_is_refused() -> None:
    other = replace(OPEN, open_vocabulary=replace(OPEN.open_vocabulary, vocab_sha256="0" * 64))
    triton = _with_model(other)
    refused = await _refused(triton, _labels_request(["wolf", "fox"]))
    assert refused.code.name == "FAILED_PRECONDITION" and "another BPE vocabulary" in refused.details
    assert triton.token_batches == []  # no token ids of the wrong vocabulary went out
    # ... and the same model with the gateway's own vocabulary answers
    reply = await service(FakeTriton()).Classify(_labels_request(["wolf", "fox"]), FakeContext())
    assert len(reply.results[0].predictions) == 2


async def test_the_prompt_budget_is_enforced_before_any_work() -> None:
    triton = FakeTriton()
    labels = [f"label {i}" for i in range(5)]
    refused = await _refused(triton, _labels_request(labels, ["a {}", "the {}", "my {}"]), max_prompts=14)
    assert refused.code.name == "INVALID_ARGUMENT" and "5 labels x 3 templates = 15 prompts; the limit is 14" \
        in refused.details
    assert triton.batches == [] and triton.token_batches == []
    reply = await service(FakeTriton(), max_prompts=15).Classify(
        _labels_request(labels, ["a {}", "the {}", "my {}"]), FakeContext())
    assert len(reply.results[0].predictions) == 5


async def test_a_models_own_templates_are_not_held_to_the_request_limit() -> None:
    """A model exported with CLIP's 80 templates answers labels with --max-templates 32: its
    templates are trusted; a request sending 40 of its own is refused."""
    many = tuple(f"a photo number {i} of a {{}}." for i in range(40))
    triton = _with_model(replace(OPEN, open_vocabulary=replace(OPEN.open_vocabulary, templates=many)))
    reply = await service(triton, max_templates=32).Classify(_labels_request(["wolf", "fox"]), FakeContext())
    assert len(reply.results[0].predictions) == 2
    assert sum(len(batch) for batch in triton.token_batches) == 2 * 40
    refused = await _refused(FakeTriton(), _labels_request(["wolf"], list(many)), max_templates=32)
    assert refused.code.name == "INVALID_ARGUMENT" and "40 templates; the limit is 32" in refused.details


async def test_labels_while_the_text_encoder_is_not_ready_are_unavailable() -> None:
    loading = replace(OPEN, open_vocabulary=None, text_model="ov_text")
    refused = await _refused(_with_model(loading), _labels_request(["wolf", "fox"]))
    assert refused.code.name == "UNAVAILABLE" and "'ov_text' of model 'ov' is not ready" in refused.details
    never = replace(OPEN, open_vocabulary=None, text_model=None)
    refused = await _refused(_with_model(never), _labels_request(["wolf", "fox"]))
    assert refused.code.name == "FAILED_PRECONDITION" and "--open-vocabulary" in refused.details


class _Recording(FakeTriton):
    """Remembers the version each side was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.image_versions: list[int] = []
        self.text_versions: list[int] = []

    async def infer_images(self, route, batch, timeout_s, output=contract.OUTPUT_NAME):
        self.image_versions.append(route.triton_version)
        return await super().infer_images(route, batch, timeout_s, output)

    async def embed_texts(self, route, tokens, timeout_s):
        self.text_versions.append(route.version)
        return await super().embed_texts(route, tokens, timeout_s)


async def test_labels_pin_both_sides_to_the_newest_version_both_have() -> None:
    """Version 3 of the classifier is ready, its text encoder only has 1 and 2: a labels call
    for the latest runs version 2 on both sides and says so; a plain call asks Triton for
    its latest (0) and reports 3."""
    text = TextEntry("ov_text", (1, 2), 8, max_batch_size=4, classifier="ov")
    ahead = replace(OPEN, versions=(1, 2, 3), open_vocabulary=replace(OPEN.open_vocabulary, text=text))
    triton = _Recording()
    triton.models["ov"] = ahead
    reply = await service(triton).Classify(_labels_request(["wolf", "fox"]), FakeContext())
    assert reply.version == 2 and triton.image_versions == [2] and triton.text_versions == [2]
    plain = await service(triton).Classify(pb.ClassifyRequest(model="ov", images=[pb.Image(encoded=image_bytes())]),
                                           FakeContext())
    assert triton.image_versions[-1] == 0 and plain.version == 3
    refused = await _refused(triton, _labels_request(["wolf", "fox"], version=3))
    assert refused.code.name == "NOT_FOUND" and "'ov_text' has no ready version 3" in refused.details


@pytest.mark.parametrize(("labels", "first", "second"), [
    (["red_panda", "Red panda"], "'red_panda'", "'Red panda'"),
    (["cat", "Red  Panda", "red panda"], "'Red  Panda'", "'red panda'"),
    (["café", "cafe\u0301"], "'café'", "'café'"),  # NFC and NFD: the tokenizer's ftfy reads them alike
    (["fish &amp; chips", "fish & chips"], "'fish &amp; chips'", "'fish & chips'"),
])
async def test_labels_the_tokenizer_reads_alike_are_refused(labels: list[str], first: str, second: str) -> None:
    refused = await _refused(FakeTriton(), _labels_request(labels))
    assert refused.code.name == "INVALID_ARGUMENT", refused.details
    assert "the model reads the two alike" in refused.details
    assert first in refused.details and second in refused.details


async def test_labels_the_tokenizer_tells_apart_are_ranked() -> None:
    reply = await service().Classify(_labels_request(["red panda", "red pandas", "Red-panda", "cafe"]), FakeContext())
    assert len(reply.results[0].predictions) == 4


# -- a large call in chunks ---------------------------------------------------------------------


async def test_a_large_call_goes_in_chunks_with_at_most_four_at_triton(monkeypatch) -> None:
    """21 prompts for a text encoder whose batch limit is 2: 11 calls, never more than
    CHUNKS_IN_FLIGHT of them at Triton at once, each row back in its place."""
    client = Triton("127.0.0.1:1")  # no call reaches it: the call itself is replaced
    at_once = peak = calls = 0

    class Answer:
        def __init__(self, values: np.ndarray, version: int) -> None:
            self.values, self.version = values, version

        def as_numpy(self, name: str) -> np.ndarray:
            return self.values

        def get_response(self):
            return type("Response", (), {"model_version": str(self.version)})()

    async def one_call(model, version, inputs, outputs, timeout_s, class_count=0):
        nonlocal at_once, peak, calls
        at_once += 1
        calls += 1
        peak = max(peak, at_once)
        await asyncio.sleep(0.01)
        at_once -= 1
        (name, tokens, _), = inputs
        return Answer(np.repeat(tokens[:, :1].astype(np.float32), 8, axis=1), version)

    monkeypatch.setattr(client, "call", one_call)
    text = TextEntry("ov_text", (1, 2), 8, max_batch_size=2, classifier="ov")
    route = replace(OPEN, open_vocabulary=replace(OPEN.open_vocabulary, text=text)).route(2, text=True)
    tokens = np.arange(21, dtype=np.int32)[:, None].repeat(contract.CONTEXT_LENGTH, axis=1)
    try:
        embeddings = await client.embed_texts(route, tokens, 10.0)
    finally:
        await client.close()
    assert CHUNKS_IN_FLIGHT == 4 and peak == CHUNKS_IN_FLIGHT, peak
    assert calls == 11 and embeddings.shape == (21, 8)
    np.testing.assert_array_equal(embeddings[:, 0], np.arange(21))
