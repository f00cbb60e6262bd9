"""Adapter banks on the gateway's request path, against the stand-in for Triton: the
adapter chosen per request, its own classes, the errors of DESIGN §8.2, version pinning,
a version replaced under a request, and what ListModels shows."""

from __future__ import annotations

import numpy as np
import pytest

from cliplora.core import contract
from cliplora.core.errors import NotFound
from cliplora.core.preprocess import preprocess_bytes
from cliplora.core.tokenizer import get_tokenizer
from cliplora.serve.gateway.discovery import _with_promotions
from cliplora.serve.gateway.errors import VersionNotReady
from cliplora.serve.gateway.models import ModelEntry, OpenVocabulary, TextEntry
from cliplora.v1 import classifier_pb2 as pb
from tests.fakes import (
    BANK,
    EMBEDDING_DIM,
    Aborted,
    FakeContext,
    FakeTriton,
    adapter_classes,
    adapter_row,
    bank_entry,
    fake_embeddings,
    image_bytes,
    service,
)


def _classify(adapter: str = "", model: str = "bank", version: int = 0, **extra) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, version=version, images=[pb.Image(encoded=image_bytes(5))], top_k=0,
                              adapter=adapter, **extra)


async def _refused(request: pb.ClassifyRequest | pb.EmbedRequest, triton: FakeTriton | None = None) -> Aborted:
    svc = service(triton)
    call = svc.Classify if isinstance(request, pb.ClassifyRequest) else svc.Embed
    with pytest.raises(Aborted) as caught:
        await call(request, FakeContext())
    return caught.value


async def test_an_adapter_answers_with_its_own_classes_and_slot() -> None:
    """logit = logit_scale x cos(the bank's image embedding for the adapter's slot, the
    adapter's class embeddings); names are the adapter's."""
    triton = FakeTriton()
    reply = await service(triton).Classify(_classify("zeta"), FakeContext())
    assert (reply.model, reply.version, reply.adapter) == ("bank", 2, "zeta")
    row = BANK.bank.tables[2]["zeta"]
    head = await triton.adapter_head(BANK.route(2, adapter="zeta"), 1.0)
    crop = preprocess_bytes(image_bytes(5), 16).reshape(1, -1)
    image = fake_embeddings(np.concatenate([crop, [[row.slot]]], axis=1).astype(np.uint8))
    expected = 10.0 * image @ head.embeddings.T
    got = {p.label: p.logit for p in reply.results[0].predictions}
    assert sorted(got) == sorted(adapter_classes(row.slot))
    np.testing.assert_allclose([got[name] for name in head.class_names], expected[0], atol=1e-5)


async def test_every_adapter_changes_the_answer() -> None:
    svc = service()
    acme = await svc.Classify(_classify("acme"), FakeContext())
    zeta = await svc.Classify(_classify("zeta"), FakeContext())
    assert [p.label for p in acme.results[0].predictions] != [p.label for p in zeta.results[0].predictions]


@pytest.mark.parametrize(("request_", "code", "says"), [
    (_classify("acme", model="m"), "INVALID_ARGUMENT", "model 'm' is not an adapter bank"),
    (_classify("nobody"), "NOT_FOUND", "adapter 'nobody' not found in bank 'bank' version 2"),
    (_classify("zeta", version=1), "NOT_FOUND", "adapter 'zeta' not found in bank 'bank' version 1"),
    (_classify("../etc"), "INVALID_ARGUMENT", "invalid adapter id '../etc'"),
    (_classify(""), "INVALID_ARGUMENT", "bank 'bank' has no classes of its own: name an adapter"),
    (_classify("acme", labels=["cat", "dog"]), "FAILED_PRECONDITION", "--open-vocabulary"),
    (pb.EmbedRequest(model="bank", adapter="acme", texts=["a cat"]), "FAILED_PRECONDITION", "--open-vocabulary"),
    (pb.EmbedRequest(model="m", adapter="acme", images=[pb.Image(encoded=image_bytes())]), "INVALID_ARGUMENT",
     "not an adapter bank"),
])
async def test_bank_requests_are_refused_with_the_status_of_the_contract(request_, code: str, says: str) -> None:
    triton = FakeTriton()
    refused = await _refused(request_, triton)
    assert refused.code.name == code and says in refused.details, refused.details
    assert triton.batches == []  # refused before any image was sent


async def test_the_base_answers_when_it_has_classes() -> None:
    triton = FakeTriton()
    triton.models["bank"] = bank_entry({1: [adapter_row("base", 0, 3), adapter_row("acme", 1, 2)]})
    reply = await service(triton).Classify(_classify(), FakeContext())
    assert reply.adapter == "base" and len(reply.results[0].predictions) == 3


async def test_embed_gives_the_adapters_image_embeddings() -> None:
    svc = service()
    request = pb.EmbedRequest(model="bank", images=[pb.Image(encoded=image_bytes())], adapter="acme")
    acme = await svc.Embed(request, FakeContext())
    request.adapter = "zeta"
    zeta = await svc.Embed(request, FakeContext())
    base = await svc.Embed(pb.EmbedRequest(model="bank", images=[pb.Image(encoded=image_bytes())]), FakeContext())
    vectors = [np.array(reply.images[0].values) for reply in (acme, zeta, base)]
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert not np.allclose(vectors[0], vectors[1]) and not np.allclose(vectors[0], vectors[2])


class _Replaced(FakeTriton):
    """Version 1 of the bank is unloaded by Triton after the gateway resolved a request to
    it: Triton says it is gone (`error`), and a refresh shows version 2."""

    def __init__(self, error: Exception = NotFound("Triton: Request for unknown model: 'bank' version 1 is not found")
                 ) -> None:
        super().__init__()
        self.error = error
        self.models["bank"] = bank_entry({1: [adapter_row("base", 0, 0), adapter_row("acme", 1, 2)]})
        self.asked: list[int] = []

    async def infer_images(self, route, batch, timeout_s, output="logits"):
        self.asked.append(route.triton_version)
        if route.triton_version == 1:
            raise self.error
        return await super().infer_images(route, batch, timeout_s, output)

    async def refresh(self):
        self.models["bank"] = bank_entry({2: [adapter_row("base", 0, 0), adapter_row("acme", 1, 2)]})
        return dict(self.models)


@pytest.mark.parametrize("error", [
    NotFound("Triton: Request for unknown model: 'bank' version 1 is not found"),
    VersionNotReady("Triton: Request for unknown model: 'bank' version 1 is not at ready state"),
])
async def test_a_version_unloaded_under_a_request_is_answered_by_the_next_one(error: Exception) -> None:
    triton = _Replaced(error)
    reply = await service(triton).Classify(_classify("acme"), FakeContext())
    assert reply.version == 2 and triton.asked == [1, 2]


async def test_a_version_that_stays_gone_is_not_found() -> None:
    class Gone(_Replaced):
        async def refresh(self):
            return dict(self.models)  # nothing newer: the NOT_FOUND stands

    refused = await _refused(_classify("acme"), Gone())
    assert refused.code.name == "NOT_FOUND" and "version 1 is not found" in refused.details


async def test_list_models_shows_a_bank_and_its_adapters() -> None:
    reply = await service().ListModels(pb.ListModelsRequest(), FakeContext())
    (bank,) = [m for m in reply.models if m.name == "bank"]
    assert bank.kind == "bank" and bank.embedding_dim == 8 and list(bank.versions) == [1, 2]
    assert [(a.id, a.num_classes, a.rank, list(a.matrices), a.version_added) for a in bank.adapters] == [
        ("base", 0, 0, [], 1), ("acme", 2, 2, ["q", "k", "v"], 1), ("zeta", 3, 2, ["q", "k", "v"], 2)]
    assert bank.adapters[1].lora_sha256 == f"{1:064x}" and bank.adapters[1].promoted_to == ""
    assert {m.name: m.kind for m in reply.models}["m"] == "classifier"
    assert not bank.open_vocabulary  # no NAME_text: labels are FAILED_PRECONDITION
    listed = await service(_open_bank()).ListModels(pb.ListModelsRequest(), FakeContext())
    assert {m.name: m.open_vocabulary for m in listed.models}["bank"]  # with its NAME_text ready


# -- promotion: a bank adapter served by its merged classifier ------------------------------------

def _promoted(adapter: str = "acme", sha: str | None = None, name: str = "bank--acme") -> ModelEntry:
    row = BANK.bank.tables[2][adapter]
    return ModelEntry(name, (1,), image_size=16, num_classes=3, max_batch_size=4,
                      class_names=("merged a", "merged b", "merged c"),
                      promotion=contract.Promotion("bank", adapter, row.lora_sha256 if sha is None else sha))


class _Recording(FakeTriton):
    def __init__(self, models: dict[str, ModelEntry]) -> None:
        super().__init__()
        self.models = _with_promotions({**self.models, **models})
        self.ran: list[str] = []

    async def infer_images(self, route, batch, timeout_s, output="logits"):
        self.ran.append(route.entry.name)
        return await super().infer_images(route, batch, timeout_s, output)


async def test_a_promoted_adapter_is_answered_by_its_merged_classifier_in_the_banks_name() -> None:
    triton = _Recording({"bank--acme": _promoted()})
    reply = await service(triton).Classify(_classify("acme"), FakeContext())
    assert triton.ran == ["bank--acme"]
    assert (reply.model, reply.adapter, reply.version) == ("bank", "acme", 2)  # the bank's version, not the copy's
    assert {p.label for p in reply.results[0].predictions} == {"merged a", "merged b", "merged c"}
    other = await service(triton).Classify(_classify("zeta"), FakeContext())
    assert triton.ran[-1] == "bank" and other.adapter == "zeta"
    listing = await service(triton).ListModels(pb.ListModelsRequest(), FakeContext())
    (bank,) = [m for m in listing.models if m.name == "bank"]
    assert {a.id: a.promoted_to for a in bank.adapters} == {"base": "", "acme": "bank--acme", "zeta": ""}


async def test_a_promotion_of_other_content_or_an_older_version_goes_to_the_bank() -> None:
    stale = _Recording({"bank--acme": _promoted(sha="f" * 64)})
    await service(stale).Classify(_classify("acme"), FakeContext())
    assert stale.ran == ["bank"]  # the adapter was replaced since it was promoted
    current = _Recording({"bank--acme": _promoted()})
    await service(current).Classify(_classify("acme", version=1), FakeContext())
    assert current.ran == ["bank"]  # version 1's table, not the promoted copy's


async def test_a_promotion_under_another_name_is_not_routed_to() -> None:
    triton = _Recording({"impostor": _promoted(name="impostor")})
    await service(triton).Classify(_classify("acme"), FakeContext())
    assert triton.ran == ["bank"]


async def test_image_embeddings_of_a_promoted_adapter_without_them_come_from_the_bank() -> None:
    triton = _Recording({"bank--acme": _promoted()})
    reply = await service(triton).Embed(pb.EmbedRequest(model="bank", adapter="acme",
                                                        images=[pb.Image(encoded=image_bytes())]), FakeContext())
    assert triton.ran == ["bank"] and len(reply.images) == 1


class _Demoted(_Recording):
    """The promoted classifier is removed under a request: Triton says it is gone, and a
    refresh no longer shows it."""

    async def infer_images(self, route, batch, timeout_s, output="logits"):
        if route.entry.name == "bank--acme":
            self.ran.append(route.entry.name)
            raise NotFound("Triton: Request for unknown model: 'bank--acme' is not found")
        return await super().infer_images(route, batch, timeout_s, output)

    async def refresh(self):
        self.models = _with_promotions({k: v for k, v in self.models.items() if k != "bank--acme"})
        return dict(self.models)


async def test_a_demoted_adapter_under_a_request_is_answered_by_the_bank() -> None:
    triton = _Demoted({"bank--acme": _promoted()})
    reply = await service(triton).Classify(_classify("acme"), FakeContext())
    assert triton.ran == ["bank--acme", "bank"] and reply.adapter == "acme"
    assert {p.label for p in reply.results[0].predictions} == set(adapter_classes(1)[:2])


# -- request-time labels on a bank adapter (--open-vocabulary) ---------------------------------------

ROWS = {1: [adapter_row("base", 0, 0), adapter_row("acme", 1, 2)],
        2: [adapter_row("base", 0, 0), adapter_row("acme", 1, 2), adapter_row("zeta", 2, 3, 2)]}


def _open_bank(text_versions: tuple[int, ...] = (1, 2), rows: dict | None = None) -> FakeTriton:
    triton = FakeTriton()
    triton.models["bank"] = bank_entry(rows or ROWS, text_versions=text_versions)
    return triton


async def test_labels_on_a_bank_adapter_go_through_its_own_text_tower() -> None:
    """Image and text sides at one version, each through the adapter's slot; logits as the
    export builds its head, from the adapter's own templates."""
    triton = _open_bank()
    svc = service(triton)
    reply = await svc.Classify(_classify("acme", labels=["wolf", "red_fox"]), FakeContext())
    assert (reply.version, reply.adapter) == (2, "acme")
    tokens = get_tokenizer()(["a photo of a wolf.", "a photo of a red fox."])
    np.testing.assert_array_equal(triton.token_batches[0], tokens)
    text = fake_embeddings(np.concatenate([tokens, [[1], [1]]], axis=1))
    crop = preprocess_bytes(image_bytes(5), 16).reshape(1, -1)
    image = fake_embeddings(np.concatenate([crop, [[1]]], axis=1).astype(np.uint8))
    got = {p.label: p.logit for p in reply.results[0].predictions}
    np.testing.assert_allclose([got["wolf"], got["red_fox"]], (10.0 * image @ text.T)[0], atol=1e-5)
    zeta = await svc.Classify(_classify("zeta", labels=["wolf", "red_fox"]), FakeContext())
    assert [p.logit for p in zeta.results[0].predictions] != [p.logit for p in reply.results[0].predictions]


async def test_the_text_cache_is_the_adapters_not_the_banks_version() -> None:
    """The same adapter's prompts are reused across bank versions; another adapter, or the
    same id with other content (replaced), never answers from that cache."""
    triton = _open_bank()
    svc = service(triton)
    labels = ["wolf", "fox"]
    await svc.Classify(_classify("acme", labels=labels), FakeContext())
    await svc.Classify(_classify("acme", labels=labels, version=1), FakeContext())  # another bank version
    assert len(triton.token_batches) == 1
    await svc.Classify(_classify("zeta", labels=labels), FakeContext())
    assert len(triton.token_batches) == 2
    replaced = {**ROWS, 3: [adapter_row("base", 0, 0), adapter_row("acme", 5, 2, 3), ROWS[2][2]]}
    triton.models["bank"] = bank_entry(replaced, text_versions=(1, 2, 3))
    reply = await svc.Classify(_classify("acme", labels=labels), FakeContext())
    assert reply.version == 3 and len(triton.token_batches) == 3  # the new content's own prompts


async def test_bank_text_encoders_not_ready_or_not_there() -> None:
    loading = FakeTriton()
    loading.models["bank"] = bank_entry(ROWS, text_model="bank_text")
    refused = await _refused(_classify("acme", labels=["wolf", "fox"]), loading)
    assert refused.code.name == "UNAVAILABLE" and "'bank_text' of bank 'bank' is not ready" in refused.details
    behind = _open_bank(text_versions=(1,))  # version 2 of the text encoder not loaded yet
    reply = await service(behind).Classify(_classify("acme", labels=["wolf", "fox"]), FakeContext())
    assert reply.version == 1
    refused = await _refused(_classify("zeta", labels=["wolf", "fox"]), behind)
    assert refused.code.name == "NOT_FOUND" and "adapter 'zeta' not found in bank 'bank' version 1" in refused.details


async def test_embed_texts_with_a_bank_adapter() -> None:
    triton = _open_bank()
    svc = service(triton)
    acme = await svc.Embed(pb.EmbedRequest(model="bank", adapter="acme", texts=["a cat"]), FakeContext())
    zeta = await svc.Embed(pb.EmbedRequest(model="bank", adapter="zeta", texts=["a cat"]), FakeContext())
    assert acme.version == 2 and not np.allclose(acme.texts[0].values, zeta.texts[0].values)


def _promoted_open(version: int = 1) -> ModelEntry:
    """`bank--acme` promoted from a bank with open vocabulary: its own text encoder, both at
    the copy's own version (1), not the bank's."""
    row = ROWS[2][1]
    text = TextEntry("bank--acme_text", (version,), EMBEDDING_DIM, max_batch_size=4, classifier="bank--acme")
    return ModelEntry("bank--acme", (version,), image_size=16, num_classes=2, max_batch_size=4,
                      class_names=("merged a", "merged b"),
                      open_vocabulary=OpenVocabulary(text, logit_scale=10.0, templates=("a photo of a {}.",),
                                                     vocab_sha256=get_tokenizer().vocab_sha256),
                      promotion=contract.Promotion("bank", "acme", row.lora_sha256))


async def test_labels_and_embed_of_a_promoted_adapter_of_an_open_vocabulary_bank() -> None:
    """The promoted copy answers labels and Embed at its own version (1) while the caller
    is told the bank's (2): asking the copy for the bank's version found nothing."""
    triton = _Recording({"bank--acme": _promoted_open()})
    triton.models = _with_promotions({**triton.models, "bank": bank_entry(ROWS, text_versions=(1, 2))})
    svc = service(triton)
    reply = await svc.Classify(_classify("acme", labels=["wolf", "red_fox"]), FakeContext())
    assert triton.ran == ["bank--acme"] and (reply.model, reply.adapter, reply.version) == ("bank", "acme", 2)
    assert {p.label for p in reply.results[0].predictions} == {"wolf", "red_fox"}
    embedded = await svc.Embed(pb.EmbedRequest(model="bank", adapter="acme", texts=["a wolf"],
                                               images=[pb.Image(encoded=image_bytes())]), FakeContext())
    assert triton.ran[-1] == "bank--acme" and embedded.version == 2
    assert len(embedded.texts) == 1 and len(embedded.images) == 1
