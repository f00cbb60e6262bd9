"""A bank with open vocabulary served end to end: `bank create --open-vocabulary`, the real
tritonserver, the gateway in this process. Request-time labels on an adapter answer as
that adapter's own merged ``export --open-vocabulary`` classifier does; text embeddings
are the adapter's (a vision-only adapter's are the base's); requests for different
adapters share ``NAME_text``'s batches; adapters added and replaced while labelled
requests stream fail none of them, and a replaced adapter's prompts are never answered
from the old one's cache.

Exported and published without Triton: tests/test_bank_text.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from cliplora.export.bank_create import BankOptions, create_bank
from cliplora.export.bank_update import AdapterSpec, add_adapters
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.serve.stack.triton_launcher import LocalTriton
from cliplora.v1 import classifier_pb2 as pb
from tests import factories
from tests.images import encoded, make_image
from tests.serving import (
    in_process_gateway,
    triton_counts,
    triton_ports,
    until_answer,
)

pytestmark = pytest.mark.triton
CLASSES = ("cat", "dog", "red_panda", "golden_retriever")
TEMPLATES = ("a photo of a {}.", "a {} in the wild.")
LABELS = ["wolf", "snow_leopard", "a very small teapot", "東京タワー", "Café"]  # none of the classes
TEXTS = ["a photo of a dog.", "", "Café crème brûlée", "a 🐱 in a hat"]
FIDELITY = 1e-4  # issue 21: in logits, an adapter's request-time labels vs its own merged export
ADAPTERS = {  # id -> the checkpoint's layout
    "both": dict(encoder="both", params=("q", "v"), position="half-up", seed=51),
    "vision": dict(encoder="vision", params=("q", "k", "v"), position="all", seed=52),
}
IMAGES = [encoded(make_image(40, 30, seed=seed), "PNG") for seed in range(3)]


@pytest.fixture(scope="module")
def ov_repository(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    """Bank `ovb` (open vocabulary, the base with classes, `both` and `vision` added in
    version 2) and `ovb-both-merged`, `both`'s own merged export with --open-vocabulary."""
    root = tmp_path_factory.mktemp("bank-text-triton")
    repository = root / "repo"
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    create_bank(BankOptions(name="ovb", model=str(tiny_config), pretrained=None, classes=classes, templates=TEMPLATES,
                            open_vocabulary=True, allow_random_weights=True, repository=repository, probes=1))
    loras = {a: factories.write_paper_checkpoint(root / f"{a}.pt", **layout) for a, layout in ADAPTERS.items()}
    add_adapters(repository, "ovb", [AdapterSpec(a, str(p), classes, TEMPLATES) for a, p in loras.items()], probes=1)
    run_export(ExportOptions(model=str(tiny_config), pretrained=None, lora=str(loras["both"]), classes=classes,
                             templates=TEMPLATES, name="ovb-both-merged", repository=repository,
                             allow_random_weights=True, probes=1, open_vocabulary=True))
    return repository


@pytest.fixture(scope="module")
def ov_triton(ov_repository: Path):
    with LocalTriton(ov_repository, ports=triton_ports(), poll_seconds=1) as server:
        yield server


def _classify(model: str, adapter: str = "", labels: list[str] = LABELS) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, adapter=adapter, images=[pb.Image(encoded=i) for i in IMAGES], top_k=0,
                              labels=labels)


def _logits(reply: pb.ClassifyResponse, labels: list[str] = LABELS) -> np.ndarray:
    """[N, L] logits in label order (a reply lists them by rank)."""
    rows = [sorted(r.predictions, key=lambda p: p.index) for r in reply.results]
    assert all([p.label for p in row] == labels for row in rows)
    return np.array([[p.logit for p in row] for row in rows])


def _texts(reply: pb.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in reply.texts])


async def test_labels_on_an_adapter_answer_as_its_own_merged_classifier(ov_triton: LocalTriton) -> None:
    async with in_process_gateway(ov_triton.grpc_url) as (_, stub):
        base = _logits(await stub.Classify(_classify("ovb")))
        reply = await stub.Classify(_classify("ovb", "both"))
        assert (reply.model, reply.adapter) == ("ovb", "both")
        merged = _logits(await stub.Classify(_classify("ovb-both-merged")))
        np.testing.assert_allclose(_logits(reply), merged, atol=FIDELITY)
        assert np.abs(_logits(reply) - base).max() > 100 * FIDELITY, "the adapter answers the labels as the base"
        # Its own classes as labels: what its adapter table answers without labels.
        own = await stub.Classify(_classify("ovb", "both", [c for c in CLASSES]))
        table = await stub.Classify(_classify("ovb", "both", []))
        np.testing.assert_allclose(_logits(own, list(CLASSES)), _logits(table, list(CLASSES)), atol=FIDELITY)


async def test_text_embeddings_are_the_adapters_and_batches_mix_adapters(ov_triton: LocalTriton) -> None:
    """`Embed` texts with `both` (text updates) are its merged export's and not the base's;
    with `vision` (none) the base's. Many requests for the three at once share
    ``ovb_text``'s executions, and each gets what it gets alone."""
    async with in_process_gateway(ov_triton.grpc_url) as (_, stub):
        alone = {a: _texts(await stub.Embed(pb.EmbedRequest(model="ovb", adapter=a, texts=TEXTS)))
                 for a in ("", "both", "vision")}
        merged = _texts(await stub.Embed(pb.EmbedRequest(model="ovb-both-merged", texts=TEXTS)))
        np.testing.assert_allclose(alone["both"], merged, atol=1e-5)
        assert np.abs(alone["both"] - alone[""]).max() > 1e-3
        np.testing.assert_allclose(alone["vision"], alone[""], atol=1e-6)
        calls = [(["", "both", "vision"][i % 3], TEXTS[i % len(TEXTS)] + " " * (i // 12)) for i in range(36)]
        before = triton_counts(ov_triton.metrics_url, "ovb_text")
        together = await asyncio.gather(*(stub.Embed(pb.EmbedRequest(model="ovb", adapter=a, texts=[t]))
                                          for a, t in calls))
        after = triton_counts(ov_triton.metrics_url, "ovb_text")
    for (adapter, text), reply in zip(calls, together, strict=True):
        np.testing.assert_allclose(_texts(reply)[0], alone[adapter][TEXTS.index(text.rstrip(" ") or "")], atol=1e-5)
    requests, executions = after[0] - before[0], after[1] - before[1]
    assert 0 < executions < requests, (requests, executions)


async def test_adds_while_labelled_requests_stream_fail_none_and_a_replaced_adapter_answers_anew(
        ov_triton: LocalTriton, ov_repository: Path, tmp_path: Path) -> None:
    classes = factories.write_classes(tmp_path / "classes.txt", ("sofa", "chair"))
    new = factories.write_paper_checkpoint(tmp_path / "new.pt", encoder="text", params=("q", "v"), seed=61)
    replacement = factories.write_paper_checkpoint(tmp_path / "replacement.pt", encoder="both", seed=62)
    outcomes: list[str] = []
    stop = asyncio.Event()
    async with in_process_gateway(ov_triton.grpc_url) as (_, stub):
        base = _logits(await stub.Classify(_classify("ovb")))
        both = _logits(await stub.Classify(_classify("ovb", "both")))
        old_vision = _texts(await stub.Embed(pb.EmbedRequest(model="ovb", adapter="vision", texts=TEXTS)))

        async def stream() -> None:  # what other callers keep asking meanwhile
            while not stop.is_set():
                try:
                    reply = await stub.Classify(_classify("ovb", "both"), timeout=30)
                    assert np.abs(_logits(reply) - both).max() < FIDELITY, "another answer for the same adapter"
                    outcomes.append("OK")
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    outcomes.append(repr(exc))

        streaming = asyncio.create_task(stream())
        try:
            await asyncio.to_thread(add_adapters, ov_repository, "ovb", [AdapterSpec("new", str(new), classes)], None, 1)
            added = await _until(stub, "new", lambda reply: True)
            assert np.abs(_logits(added) - base).max() > 100 * FIDELITY, "a text adapter answers labels as the base"
            replaced = await asyncio.to_thread(add_adapters, ov_repository, "ovb",
                                               [AdapterSpec("vision", str(replacement), classes)], None, 1)
            await _until(stub, "vision", lambda reply: reply.version >= replaced.version)
            for _ in range(3):  # the new content's prompts, never the old one's from the cache
                now = _texts(await stub.Embed(pb.EmbedRequest(model="ovb", adapter="vision", texts=TEXTS)))
                assert np.abs(now - old_vision).max() > 1e-3
        finally:
            stop.set()
            await streaming
    failures = [o for o in outcomes if o != "OK"]
    assert len(outcomes) > 3 and not failures, failures[:3]


async def _until(stub, adapter: str, done, timeout_s: float = 60.0) -> pb.ClassifyResponse:
    return await until_answer(lambda: stub.Classify(_classify("ovb", adapter)), done, f"adapter {adapter}", timeout_s)
