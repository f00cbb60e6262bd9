"""Adapter banks end to end: a tiny bank published by `cliplora.export` and served by the
real tritonserver, through the gateway. Each adapter answers like its own merged export;
requests for different adapters share Triton's batches and each still gets its own
adapter; adapters are added, replaced and removed while requests keep flowing, none
failing, and a replaced adapter never answers with its old content once the new one has."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest

from cliplora.export.bank_create import BankOptions, create_bank
from cliplora.export.bank_update import AdapterSpec, add_adapters, remove_adapter
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.serve.stack.triton_launcher import LocalTriton
from cliplora.v1 import classifier_pb2 as pb
from tests import factories
from tests.images import encoded, make_image
from tests.serving import (
    in_process_gateway,
    metrics_text,
    triton_counts,
    triton_ports,
    until_answer,
)

pytestmark = pytest.mark.triton
CLASSES = ("cat", "dog", "red_panda", "golden_retriever")
FIDELITY = 1e-4  # issue 20: each adapter in a bank equals its own merged export within 1e-4 in logits
ADAPTERS = {  # id -> the checkpoint's layout
    "vision": dict(encoder="vision", params=("q", "k", "v"), position="all", seed=11),
    "both": dict(encoder="both", params=("q", "v"), position="half-up", seed=12, r=1),
    "text": dict(encoder="text", params=("q", "k", "v"), position="all", seed=13),
}


@pytest.fixture(scope="module")
def bank_repository(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Path:
    """Bank `shop` (base with the classes, three adapters) and, for each adapter, its own
    merged export `shop-ID-merged` with the same classes and template."""
    root = tmp_path_factory.mktemp("bank")
    repository = root / "repo"
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    create_bank(BankOptions(name="shop", model=str(tiny_config), pretrained=None, classes=classes,
                            allow_random_weights=True, repository=repository, probes=2))
    specs = []
    for adapter, layout in ADAPTERS.items():
        lora = factories.write_paper_checkpoint(root / f"{adapter}.pt", **layout)
        specs.append(AdapterSpec(adapter, str(lora), classes))
        run_export(ExportOptions(model=str(tiny_config), pretrained=None, lora=str(lora), classes=classes,
                                 templates=(), name=f"shop-{adapter}-merged", repository=repository,
                                 allow_random_weights=True, probes=2))
    add_adapters(repository, "shop", specs, probes=2)
    return repository


@pytest.fixture(scope="module")
def bank_triton(bank_repository: Path):
    with LocalTriton(bank_repository, ports=triton_ports()) as server:
        yield server


IMAGES = [encoded(make_image(40, 30, seed=seed), "PNG") for seed in range(3)]


def _request(model: str, adapter: str = "", images: list[bytes] = IMAGES) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, adapter=adapter, images=[pb.Image(encoded=i) for i in images], top_k=0)


def _logits(reply: pb.ClassifyResponse) -> np.ndarray:
    """[N, C] logits in class order (a reply lists them by rank)."""
    return np.array([[p.logit for p in sorted(r.predictions, key=lambda p: p.index)] for r in reply.results])


async def test_each_adapter_answers_like_its_own_merged_export(bank_triton: LocalTriton) -> None:
    async with in_process_gateway(bank_triton.grpc_url) as (_, stub):
        base = _logits(await stub.Classify(_request("shop")))
        answers = {}
        for adapter in ADAPTERS:
            reply = await stub.Classify(_request("shop", adapter))
            assert reply.adapter == adapter and reply.model == "shop"
            assert [p.label for p in sorted(reply.results[0].predictions, key=lambda p: p.index)] == list(CLASSES)
            answers[adapter] = _logits(reply)
            merged = _logits(await stub.Classify(_request(f"shop-{adapter}-merged")))
            np.testing.assert_allclose(answers[adapter], merged, atol=FIDELITY, err_msg=adapter)
            assert np.abs(answers[adapter] - base).max() > 100 * FIDELITY, f"{adapter} answers like the base"
        assert np.abs(answers["vision"] - answers["both"]).max() > 100 * FIDELITY


async def test_a_batch_mixing_adapters_equals_each_answer_alone(bank_triton: LocalTriton) -> None:
    """Many single-image requests at once, for every adapter in turn: Triton's dynamic
    batcher puts several adapters into one execution (fewer executions than requests),
    and every answer equals the same request sent alone."""
    adapters = ["", *ADAPTERS]
    calls = [(adapters[i % len(adapters)], IMAGES[i % len(IMAGES)]) for i in range(48)]
    async with in_process_gateway(bank_triton.grpc_url) as (_, stub):
        alone = {(adapter, image): _logits(await stub.Classify(_request("shop", adapter, [image])))
                 for adapter, image in set(calls)}
        before = triton_counts(bank_triton.metrics_url, "shop")
        together = await asyncio.gather(*(stub.Classify(_request("shop", a, [i])) for a, i in calls))
        after = triton_counts(bank_triton.metrics_url, "shop")
    for (adapter, image), reply in zip(calls, together, strict=True):
        np.testing.assert_allclose(_logits(reply), alone[(adapter, image)], atol=1e-5)
    requests, executions = after[0] - before[0], after[1] - before[1]
    assert requests == len(calls) and executions < requests, (requests, executions)


async def test_adding_replacing_and_removing_adapters_fail_no_request(
        bank_triton: LocalTriton, bank_repository: Path, tmp_path: Path) -> None:
    classes = factories.write_classes(tmp_path / "classes.txt", ("sofa", "chair"))
    new = factories.write_paper_checkpoint(tmp_path / "new.pt", encoder="vision", seed=21)
    replacement = factories.write_paper_checkpoint(tmp_path / "replacement.pt", encoder="vision", seed=22)
    outcomes: list[str] = []
    stop = asyncio.Event()
    async with in_process_gateway(bank_triton.grpc_url) as (_, stub):
        old_both = _logits(await stub.Classify(_request("shop", "both")))

        async def stream() -> None:  # what other callers keep asking meanwhile
            while not stop.is_set():
                try:
                    await stub.Classify(_request("shop", "vision"), timeout=30)
                    outcomes.append("OK")
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    outcomes.append(repr(exc))

        streaming = asyncio.create_task(stream())
        try:
            started = time.monotonic()
            await asyncio.to_thread(add_adapters, bank_repository, "shop", [AdapterSpec("new", str(new), classes)], None, 2)
            published = time.monotonic() - started
            reply = await _until_answered(stub, "new")
            print(f"\nadd: published after {published:.1f} s, answering {time.monotonic() - started:.1f} s after the start")
            assert [p.label for p in reply.results[0].predictions] and reply.results[0].predictions[0].label in \
                ("sofa", "chair")

            await asyncio.to_thread(add_adapters, bank_repository, "shop",
                                    [AdapterSpec("both", str(replacement), classes)], None, 2)
            first = await _until(stub, "both", lambda reply: len(reply.results[0].predictions) == 2)
            for _ in range(10):  # once the new content answered, never the old again
                reply = await stub.Classify(_request("shop", "both"))
                assert len(reply.results[0].predictions) == 2 and reply.version >= first.version
            assert old_both.shape[1] == len(CLASSES)
            # The new content's image side too, not only its classes: the published version's
            # own graph in process, for the replacement's record, gives the served logits.
            np.testing.assert_allclose(_logits(first), _published_logits(bank_repository, first.version, "both"),
                                       atol=FIDELITY)

            await asyncio.to_thread(remove_adapter, bank_repository, "shop", "new")
            await _until_not_found(stub, "new")
        finally:
            stop.set()
            await streaming
    failures = [o for o in outcomes if o != "OK"]
    assert outcomes and not failures, failures[:3]


def _published_logits(repository: Path, version: int, adapter: str) -> np.ndarray:
    """[N, C] logits of the bank version's published graph, in process, for IMAGES."""
    from cliplora.core.bank_runtime import open_bank
    from cliplora.core.preprocess import preprocess_bytes

    bank = open_bank(repository, "shop", version)
    record = bank.adapter(adapter)
    crops = np.stack([preprocess_bytes(image, bank.image_size) for image in IMAGES])
    return bank.logits(bank.image_embeddings(crops, record), bank.classes(record)[0])


async def _until(stub, adapter: str, done, timeout_s: float = 60.0) -> pb.ClassifyResponse:
    return await until_answer(lambda: stub.Classify(_request("shop", adapter)), done, f"adapter {adapter}", timeout_s)


async def _until_answered(stub, adapter: str) -> pb.ClassifyResponse:
    return await _until(stub, adapter, lambda reply: reply.adapter == adapter)


async def _until_not_found(stub, adapter: str, timeout_s: float = 60.0) -> None:
    import grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            await stub.Classify(_request("shop", adapter))
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                assert f"adapter {adapter!r} not found" in exc.details()
                return
            raise
        await asyncio.sleep(0.2)
    raise AssertionError(f"adapter {adapter} still answers {timeout_s:.0f} s after its removal")


async def test_predict_classify_and_embed_with_an_adapter_agree(bank_triton: LocalTriton, bank_repository: Path,
                                                                 tmp_path: Path, capsys) -> None:
    """`cliplora predict --adapter` (in process) prints what `cliplora classify --adapter`
    gets from the gateway; `embed --adapter` gives that adapter's image embedding."""
    import json

    from cliplora.cli import main

    image = tmp_path / "image.png"
    image.write_bytes(IMAGES[1])

    def printed(argv: list[str]) -> object:
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    predicted = printed(["predict", "--repository", str(bank_repository), "--name", "shop", "--adapter", "vision",
                         "--top-k", "0", str(image)])
    async with in_process_gateway(bank_triton.grpc_url) as (gateway, _):
        call = ["--target", f"127.0.0.1:{gateway.port}", "--model", "shop"]
        classified = await asyncio.to_thread(printed, ["classify", *call, "--adapter", "vision", "--top-k", "0",
                                                       str(image)])
        vision, both = [await asyncio.to_thread(printed, ["embed", *call, "--adapter", adapter, str(image)])
                        for adapter in ("vision", "both")]
    by_label = {p["label"]: p["logit"] for p in classified[0]["predictions"]}
    assert [p["label"] for p in predicted[0]["predictions"]] == [p["label"] for p in classified[0]["predictions"]]
    np.testing.assert_allclose([p["logit"] for p in predicted[0]["predictions"]],
                               [by_label[p["label"]] for p in predicted[0]["predictions"]], atol=1e-4)
    assert not np.allclose(vision[0]["embedding"], both[0]["embedding"])


@pytest.mark.parametrize(("name", "adapter", "code", "says"), [
    ("shop", "nobody", "NOT_FOUND", "adapter 'nobody' not found in bank 'shop'"),
    ("shop-vision-merged", "vision", "INVALID_ARGUMENT", "is not an adapter bank"),
    ("shop", "../x", "INVALID_ARGUMENT", "invalid adapter id"),
])
def test_predict_refuses_a_wrong_adapter(bank_repository: Path, tmp_path: Path, capsys, name: str, adapter: str,
                                         code: str, says: str) -> None:
    from cliplora.cli import main

    image = tmp_path / "image.png"
    image.write_bytes(IMAGES[0])
    assert main(["predict", "--repository", str(bank_repository), "--name", name, "--adapter", adapter,
                 str(image)]) == 1
    err = capsys.readouterr().err
    assert f"{code}: " in err and says in err, err


async def test_loadtest_interleaves_a_model_an_adapter_and_every_adapter(bank_triton: LocalTriton,
                                                                          tmp_path: Path) -> None:
    """`cliplora loadtest --models shop,shop@vision,shop@* --adapter-skew zipf:1.1`: three
    interleaved entries, none failing; the @* entry reached every adapter of the bank
    (the gateway counts requests per adapter: cliplora_gateway_adapter_requests_total)."""
    import json

    from cliplora.cli import main

    async with in_process_gateway(bank_triton.grpc_url) as (gateway, _):
        argv = ["loadtest", "--target", f"127.0.0.1:{gateway.port}", "--models", "shop,shop@vision,shop@*",
                "--adapter-skew", "zipf:1.1", "--concurrency", "2", "--duration", "4", "--warmup", "0.5",
                "--report", str(tmp_path / "report"), "--quiet"]
        assert await asyncio.to_thread(main, argv) == 0
        text = metrics_text(gateway.metrics_port)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["models"]) == {"shop", "shop@vision", "shop@*"}
    assert all(m["requests"] > 0 and m["errors"] == 0 for m in report["models"].values()), report["models"]
    counted = {adapter: float(value) for adapter, value in re.findall(
        r'^cliplora_gateway_adapter_requests_total\{adapter="([^"]+)",model="shop"\} (\S+)', text, re.M)}
    assert set(ADAPTERS) <= set(counted) and all(counted[a] > 0 for a in ADAPTERS), counted


async def _promoted_to(stub) -> str:
    listing = await stub.ListModels(pb.ListModelsRequest())
    bank = next(m for m in listing.models if m.name == "shop")
    return next(a.promoted_to for a in bank.adapters if a.id == "vision")


async def test_promoting_and_demoting_while_serving_fail_no_request(bank_triton: LocalTriton,
                                                                    bank_repository: Path) -> None:
    """Issue 21: `bank promote` while requests for the adapter stream: the gateway moves them
    to the merged `shop--vision` (Triton counts them there) with the bank's answers (the export
    tolerance); `bank demote` moves them back; no request fails either way. Last in this
    module: it leaves the repository as it found it."""
    from cliplora.export.bank_promote import promote_adapter
    from cliplora.export.bank_promotions import demote_adapter

    promoted = "shop--vision"
    outcomes: list[str] = []
    answers: list[np.ndarray] = []
    stop = asyncio.Event()
    async with in_process_gateway(bank_triton.grpc_url) as (_, stub):
        from_bank = _logits(await stub.Classify(_request("shop", "vision")))
        assert np.abs(from_bank - _logits(await stub.Classify(_request("shop")))).max() > 100 * FIDELITY  # not the base

        async def stream() -> None:
            while not stop.is_set():
                try:
                    answers.append(_logits(await stub.Classify(_request("shop", "vision"), timeout=30)))
                    outcomes.append("OK")
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    outcomes.append(repr(exc))

        streaming = asyncio.create_task(stream())
        try:
            await asyncio.to_thread(promote_adapter, bank_repository, "shop", "vision")
            deadline = time.monotonic() + 90
            while triton_counts(bank_triton.metrics_url, promoted)[0] < 5:  # the stream reached the merged model
                assert time.monotonic() < deadline, "no request reached the promoted model within 90 s"
                await asyncio.sleep(0.2)
            assert await _promoted_to(stub) == promoted
            await asyncio.to_thread(demote_adapter, bank_repository, "shop", "vision")
            deadline = time.monotonic() + 90
            while await _promoted_to(stub):
                assert time.monotonic() < deadline, "the adapter still promoted 90 s after its demotion"
                await asyncio.sleep(0.2)
            served_merged = triton_counts(bank_triton.metrics_url, promoted)[0]
            count = len(outcomes)
            await _until(stub, "vision", lambda _: len(outcomes) >= count + 5)  # the stream goes on, from the bank
        finally:
            stop.set()
            await streaming
    failures = [o for o in outcomes if o != "OK"]
    assert outcomes and not failures, failures[:3]
    assert served_merged >= 5
    worst = max(float(np.abs(a - from_bank).max()) for a in answers)
    assert worst < FIDELITY, worst  # merged or banked, the same answers


async def test_the_model_info_metric_names_a_banks_base(bank_triton: LocalTriton, bank_repository: Path) -> None:
    """`cliplora_gateway_model_info` for a bank: its base model and weights from the bank's
    manifest, lora "bank" (the bank's manifest is not a classifier's; it showed "unknown")."""
    from cliplora.core.bank_manifest import BankManifest
    from cliplora.serve.gateway.catalogue import Catalogue
    from cliplora.serve.gateway.metrics import GatewayMetrics
    from cliplora.serve.gateway.triton import Triton

    triton = Triton(bank_triton.grpc_url)
    try:
        models = await triton.refresh()
    finally:
        await triton.close()
    catalogue = Catalogue(bank_repository, GatewayMetrics())
    catalogue.publish_model_info(models)
    labels = {s.labels["model"]: s.labels for m in catalogue.metrics.model_info.collect() for s in m.samples}
    manifest = BankManifest.read(bank_repository / "shop" / str(max(models["shop"].versions)) / "manifest.json")
    assert labels["shop"]["lora"] == "bank" and labels["shop"]["base_model"] == manifest.source.base.model
    merged = labels["shop-vision-merged"]
    assert merged["lora"] == "clip-lora" and (merged["base_model"], merged["base_weights"]) == \
        (labels["shop"]["base_model"], labels["shop"]["base_weights"])  # the bank pairs with its base


@pytest.mark.subprocess
async def test_a_bank_through_cliplora_serve(bank_repository: Path, tmp_path: Path) -> None:
    """The whole product on the bank's repository: `cliplora serve` (its own Triton, gateway
    with --repository, Prometheus) answers an adapter as the published graph does in
    process, lists the bank with its adapters, and counts the adapter's requests."""
    from tests.serving import classifier_stub, stack_process

    async with stack_process(bank_repository, tmp_path) as stack:
        channel, stub = classifier_stub(stack.port)
        async with channel:
            reply = await _until_answered(stub, "vision")
            listing = await stub.ListModels(pb.ListModelsRequest())
        metrics = metrics_text(stack.metrics_port)
    np.testing.assert_allclose(_logits(reply), _published_logits(bank_repository, reply.version, "vision"),
                               atol=FIDELITY)
    (bank,) = [m for m in listing.models if m.name == "shop"]
    assert bank.kind == "bank" and {"base", "vision", "text"} <= {a.id for a in bank.adapters}
    assert re.search(r'^cliplora_gateway_adapter_requests_total\{adapter="vision",model="shop"\} [1-9]', metrics, re.M)
    assert re.search(r'^cliplora_gateway_model_info\{[^}]*lora="bank",model="shop"\} 1', metrics, re.M)
