"""Open vocabulary end to end: `export --open-vocabulary`, the real Triton, the gateway,
`predict`/`classify`/`embed`/`evaluate` with request-time labels.

Tiny real models: `ovlora` (a paper LoRA adapting q and v of both towers), `ovbase`
(no adapter), both exported with --open-vocabulary, and `plain` (without it).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cliplora.core import contract, open_vocab
from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.core.manifest import Manifest, TextEncoderManifest
from cliplora.export import model_config
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.export.verify import reference_features
from cliplora.model.adapters import load_adapter
from cliplora.model.reference import build_reference
from cliplora.predict import predict_files
from cliplora.serve.stack.triton_launcher import LocalTriton
from cliplora.v1 import classifier_pb2 as pb
from tests import factories
from tests.serving import CLASSES, in_process_gateway, metrics_text, triton_ports

TEMPLATES = ("a photo of a {}.", "a {} in the wild.")
UNSEEN = ["wolf", "snow_leopard", "a very small teapot", "東京タワー", "Café"]
CLI = str(Path(sys.executable).with_name("cliplora"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("open-vocabulary")
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    lora = factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="all", params=("q", "v"))
    common = dict(model=str(tiny_config), pretrained=None, classes=classes, templates=TEMPLATES,
                  repository=root / "repo", allow_random_weights=True, probes=3)
    results = {
        "ovlora": run_export(ExportOptions(lora=str(lora), name="ovlora", open_vocabulary=True, **common)),
        "ovbase": run_export(ExportOptions(lora="none", name="ovbase", open_vocabulary=True, **common)),
        "plain": run_export(ExportOptions(lora="none", name="plain", **common)),
    }
    return {"repository": root / "repo", "results": results, "lora": lora, "classes": classes, "common": common}


@pytest.fixture(scope="module")
def triton(exported):
    with LocalTriton(exported["repository"], ports=triton_ports()) as server:
        yield server


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ov-images")
    paths = []
    for i, (w, h) in enumerate([(64, 48), (40, 90), (33, 33)]):
        path = root / f"img{i}.png"
        factories.make_image(w, h, seed=40 + i).save(path)
        paths.append(path)
    return paths


def _logits(reply: pb.ClassifyResponse) -> list[dict[str, float]]:
    return [{p.label: p.logit for p in result.predictions} for result in reply.results]


def _request(model: str, images: list[Path], **fields) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, top_k=0, images=[pb.Image(encoded=p.read_bytes()) for p in images], **fields)


# -- export ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_publishes_the_text_encoder_beside_the_classifier(exported) -> None:
    repository = exported["repository"]
    result = exported["results"]["ovlora"]
    assert result.text_path == repository / "ovlora_text" / "1" and (result.text_path / "model.onnx").is_file()
    manifest = Manifest.read(result.path / "manifest.json")
    vocabulary = manifest.open_vocabulary
    assert vocabulary is not None and vocabulary.text_model == "ovlora_text" and vocabulary.embedding_dim == 32
    assert vocabulary.tokenizer.context_length == 77 and vocabulary.tokenizer.kind == "clip-bpe"
    assert vocabulary.logit_scale == pytest.approx(1 / 0.07, rel=1e-6) and manifest.templates == list(TEMPLATES)
    check = vocabulary.verification
    assert check.passed and check.tokenizer_matches and check.strings >= len(CLASSES) * len(TEMPLATES)
    assert check.text_vs_reference.max_logit_error <= 1e-3 and check.image_embeds_vs_reference.max_logit_error <= 1e-3
    assert check.text_vs_base is not None and check.text_vs_base.max_logit_error > 0.1  # the adapter moved the text
    text = TextEncoderManifest.read(result.text_path / "manifest.json")
    assert (text.classifier, text.version, text.embedding_dim) == ("ovlora", 1, 32)
    assert manifest.tensors.embeddings is not None and manifest.tensors.embeddings.name == "image_embeds"
    assert exported["results"]["plain"].manifest.open_vocabulary is None

    config = model_config.parse_config((repository / "ovlora" / "config.pbtxt").read_text())
    assert [o.name for o in config.output] == ["logits", "image_embeds"] and list(config.output[1].dims) == [32]
    assert config.parameters["text_model"].string_value == "ovlora_text"
    assert json.loads(config.parameters["templates"].string_value) == list(TEMPLATES)
    assert float(config.parameters["logit_scale"].string_value) == vocabulary.logit_scale
    text_config = model_config.parse_config((repository / "ovlora_text" / "config.pbtxt").read_text())
    assert [(i.name, list(i.dims)) for i in text_config.input] == [("tokens", [77])]
    assert [(o.name, list(o.dims)) for o in text_config.output] == [("text_embeds", [32])]
    assert text_config.parameters["classifier"].string_value == "ovlora"
    plain = model_config.parse_config((repository / "plain" / "config.pbtxt").read_text())
    assert [o.name for o in plain.output] == ["logits"] and "text_model" not in plain.parameters


@pytest.mark.slow
def test_a_second_version_keeps_both_models_in_step(exported, tmp_path) -> None:
    options = ExportOptions(lora="none", name="ovbase", open_vocabulary=True, **exported["common"])
    again = run_export(options)
    try:
        assert again.version == 2 and again.text_path == exported["repository"] / "ovbase_text" / "2"
        assert TextEncoderManifest.read(again.text_path / "manifest.json").version == 2
    finally:
        import shutil

        shutil.rmtree(again.path)
        shutil.rmtree(again.text_path)


@pytest.mark.slow
def test_names_are_reserved_both_ways(exported) -> None:
    common = exported["common"]
    with pytest.raises(FailedPrecondition, match="'ovlora_text' is the text encoder of the open-vocabulary model"):
        run_export(ExportOptions(lora="none", name="ovlora_text", **common))
    # A classifier called plain_text (plain has no text encoder, so the name is free), then
    # plain with --open-vocabulary: refused, its text encoder's name is taken.
    squatter = run_export(ExportOptions(lora="none", name="plain_text", **common))
    try:
        with pytest.raises(FailedPrecondition, match="already has a model called 'plain_text'"):
            run_export(ExportOptions(lora="none", name="plain", open_vocabulary=True, **common))
    finally:
        import shutil

        shutil.rmtree(squatter.path.parent)
    with pytest.raises(InvalidArgument, match="at most 59 characters"):
        run_export(ExportOptions(lora="none", name="x" * 60, open_vocabulary=True, **common))


@pytest.mark.slow
def test_names_are_checked_again_under_the_publishing_locks(exported, monkeypatch) -> None:
    """An export of `ovlora_text` whose early checks ran before `ovlora --open-vocabulary`
    had landed (here: the export's early checks skipped) is refused when it publishes,
    under the locks, naming the reservation, and publishes nothing."""
    import types

    from cliplora.export import pipeline, publish

    early = types.SimpleNamespace(**vars(publish))  # what run_export calls before publishing
    early.preflight = early.check_compatible = early.check_names = lambda *args, **kwargs: None
    monkeypatch.setattr(pipeline, "publish", early)
    root = exported["repository"]
    before = sorted(p.name for p in (root / "ovlora_text").iterdir())
    with pytest.raises(FailedPrecondition, match="'ovlora_text' is the text encoder of the open-vocabulary model"):
        run_export(ExportOptions(lora="none", name="ovlora_text", **exported["common"]))
    assert sorted(p.name for p in (root / "ovlora_text").iterdir()) == before
    assert TextEncoderManifest.read(root / "ovlora_text" / "1" / "manifest.json")  # still the text encoder


# -- serving ---------------------------------------------------------------------------------

async def test_own_labels_and_templates_give_the_fixed_head(triton, exported, images) -> None:
    """labels = the model's classes, templates = its templates: the folded head's logits to 1e-4,
    for the base and for a LoRA that adapts the text tower (whose logits differ)."""
    async with in_process_gateway(triton.grpc_url, exported["repository"]) as (_, stub):
        answered = {}
        for model in ("ovlora", "ovbase"):
            fixed = _logits(await stub.Classify(_request(model, images)))
            own = _logits(await stub.Classify(_request(model, images, labels=CLASSES, templates=TEMPLATES)))
            default_templates = _logits(await stub.Classify(_request(model, images, labels=CLASSES)))
            for a, b, c in zip(fixed, own, default_templates, strict=True):
                assert set(a) == set(b) == set(CLASSES)
                assert max(abs(a[k] - b[k]) for k in a) < 1e-4 and max(abs(a[k] - c[k]) for k in a) < 1e-4
            answered[model] = own
        differences = [abs(x[k] - y[k]) for x, y in zip(answered["ovlora"], answered["ovbase"], strict=True) for k in x]
        assert max(differences) > 1e-2  # merged != base: the comparison is not trivially equal


async def test_request_time_labels_equal_the_unmerged_reference(triton, exported, images, tiny_base) -> None:
    """Labels the model never saw: the gateway's logits are those of the unmerged PyTorch
    reference (open_clip's tokenizer and preprocessing, the adapter as branches)."""
    adapter = load_adapter(str(exported["lora"]), 12, 12)
    reference = build_reference(tiny_base.model, adapter)
    with torch.no_grad():
        tokens = tiny_base.tokenizer(open_vocab.prompts(UNSEEN, TEMPLATES))
        prompts = F.normalize(reference.encode_text(tokens).float(), dim=-1).reshape(len(UNSEEN), len(TEMPLATES), -1)
        heads = F.normalize(prompts.mean(dim=1), dim=-1).numpy()
    from PIL import Image

    features = reference_features(reference, [Image.open(p) for p in images], 32, tiny_base.mean, tiny_base.std)
    expected = tiny_base.logit_scale * features @ heads.T
    async with in_process_gateway(triton.grpc_url, exported["repository"]) as (_, stub):
        got = _logits(await stub.Classify(_request("ovlora", images, labels=UNSEEN, templates=TEMPLATES)))
    got_matrix = np.array([[row[label] for label in UNSEEN] for row in got])
    np.testing.assert_allclose(got_matrix, expected, atol=1e-4, rtol=0)
    base = build_reference(tiny_base.model, None)
    with torch.no_grad():
        base_text = F.normalize(base.encode_text(tokens).float(), dim=-1).reshape(len(UNSEEN), len(TEMPLATES), -1)
    base_logits = tiny_base.logit_scale * features @ F.normalize(base_text.mean(dim=1), dim=-1).numpy().T
    assert np.abs(got_matrix - base_logits).max() > 1e-2  # the adapted text tower is what answered


async def test_embed_dot_products_are_the_logits(triton, exported, images) -> None:
    labels = ["wolf", "a red fox"]
    async with in_process_gateway(triton.grpc_url, exported["repository"]) as (gateway, stub):
        reply = await stub.Embed(pb.EmbedRequest(model="ovlora", images=[pb.Image(encoded=p.read_bytes()) for p in images],
                                                 texts=labels))
        logits = _logits(await stub.Classify(_request("ovlora", images, labels=labels, templates=["{}"])))
        listing = {m.name: m for m in (await stub.ListModels(pb.ListModelsRequest())).models}
    image_embeds = np.array([e.values for e in reply.images])
    text_embeds = np.array([e.values for e in reply.texts])
    assert reply.model == "ovlora" and reply.version == 1 and image_embeds.shape == (3, 32) and text_embeds.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(image_embeds, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_embeds, axis=1), 1, atol=1e-5)
    scale = exported["results"]["ovlora"].manifest.open_vocabulary.logit_scale
    expected = scale * image_embeds @ text_embeds.T
    np.testing.assert_allclose([[row[label] for label in labels] for row in logits], expected, atol=1e-4)
    assert listing["ovlora"].open_vocabulary and listing["ovlora"].embedding_dim == 32
    assert not listing["plain"].open_vocabulary and listing["plain"].embedding_dim == 0
    assert "ovlora_text" not in listing  # text encoders are not classifiers


async def test_the_http_door_answers_labels_and_embeddings_as_grpc_does(triton, exported, images) -> None:
    """Through a real Triton: request-time labels over HTTP JSON are gRPC's answer to the
    bit, and OpenAI-shaped /v1/embeddings (texts and a data-URL image, mixed) are Embed's."""
    import base64

    import aiohttp

    from tests.ports import free_port

    labels = ["wolf", "a red fox", "cat"]
    port = free_port()
    async with in_process_gateway(triton.grpc_url, exported["repository"], http_port=port) as (_, stub):
        reply = await stub.Classify(_request("ovlora", images, labels=labels, templates=TEMPLATES))
        embedded = await stub.Embed(pb.EmbedRequest(model="ovlora", images=[pb.Image(encoded=images[0].read_bytes())],
                                                    texts=labels[:2]))
        image_url = "data:image/png;base64," + base64.b64encode(images[0].read_bytes()).decode()
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.post("/v1/classify", json={
                    "model": "ovlora", "top_k": 0, "labels": labels, "templates": list(TEMPLATES),
                    "images": [{"b64": base64.b64encode(p.read_bytes()).decode()} for p in images]}) as answer:
                assert answer.status == 200, await answer.text()
                classified = await answer.json()
            async with http.post("/v1/embeddings", json={"model": "ovlora",
                                                         "input": [labels[0], image_url, labels[1]]}) as answer:
                assert answer.status == 200, await answer.text()
                vectors = [row["embedding"] for row in (await answer.json())["data"]]
    assert [{p["label"]: p["logit"] for p in r["predictions"]} for r in classified] == _logits(reply)
    assert [[p["score"] for p in r["predictions"]] for r in classified] == [
        [p.score for p in result.predictions] for result in reply.results]
    assert _logits(reply)[0] != _logits(reply)[1]  # images that differ get answers that differ
    np.testing.assert_array_equal(np.float32(vectors[0]), np.float32(embedded.texts[0].values))
    np.testing.assert_array_equal(np.float32(vectors[1]), np.float32(embedded.images[0].values))
    np.testing.assert_array_equal(np.float32(vectors[2]), np.float32(embedded.texts[1].values))
    assert not np.allclose(vectors[0], vectors[2])


def _text_inferences(triton: LocalTriton, model: str) -> int:
    text = metrics_text(triton.metrics_url)
    counts = re.findall(rf'^nv_inference_count{{model="{model}",version="1"}} (\d+)', text, re.M)
    return int(counts[0]) if counts else 0


async def test_the_cache_spares_the_text_encoder_and_keeps_its_bound(triton, exported, images) -> None:
    """Room for six prompt embeddings: a repeated call costs the text encoder nothing (Triton's
    own inference count says so); a new label evicts the least recently used prompts, and
    asking for those again goes back to the text encoder for exactly them."""
    labels = ["quokka", "axolotl", "pangolin"]  # six prompts with the two templates

    async def classify(stub, chosen: list[str]) -> pb.ClassifyResponse:
        return await stub.Classify(_request("ovlora", images[:1], labels=chosen, templates=TEMPLATES))

    async with in_process_gateway(triton.grpc_url, exported["repository"], text_cache_entries=6) as (gateway, stub):
        registry = gateway.metrics.registry

        def cache(name: str) -> float | None:
            return registry.get_sample_value(f"cliplora_gateway_text_cache_{name}", {"model": "ovlora"})

        before = _text_inferences(triton, "ovlora_text")
        first = await classify(stub, labels)
        assert _text_inferences(triton, "ovlora_text") == before + 6 and cache("misses_total") == 6
        second = await classify(stub, labels)
        assert _text_inferences(triton, "ovlora_text") == before + 6  # not one call to the text encoder
        assert cache("hits_total") == 6 and _logits(first) == _logits(second)
        await classify(stub, ["ocelot"])  # two new prompts push out quokka's two
        assert registry.get_sample_value("cliplora_gateway_text_cache_entries") == 6 == len(gateway.service.handlers.text.cache)
        await classify(stub, labels)
        assert _text_inferences(triton, "ovlora_text") == before + 6 + 2 + 2
        assert cache("misses_total") == 6 + 2 + 2 and cache("hits_total") == 6 + 4


async def test_every_vocabulary_error_from_a_real_request(triton, exported, images) -> None:
    one = [pb.Image(encoded=images[0].read_bytes())]
    cases = [
        (pb.ClassifyRequest(model="plain", images=one, labels=["cat"]), "FAILED_PRECONDITION", "--open-vocabulary"),
        (pb.EmbedRequest(model="plain", texts=["cat"]), "FAILED_PRECONDITION", "--open-vocabulary"),
        (pb.ClassifyRequest(model="ovlora", images=one, labels=["a", "b", "c", "d"]), "INVALID_ARGUMENT",
         "4 labels; the limit is 3"),
        (pb.ClassifyRequest(model="ovlora", images=one, labels=["a", " "]), "INVALID_ARGUMENT", "label 1 is empty"),
        (pb.ClassifyRequest(model="ovlora", images=one, labels=["a", "a"]), "INVALID_ARGUMENT", "given twice"),
        (pb.ClassifyRequest(model="ovlora", images=one, labels=["red_panda", "Red  panda"]), "INVALID_ARGUMENT",
         "label 1 ('Red  panda') is label 0 ('red_panda') again"),
        (pb.ClassifyRequest(model="ovlora", images=one, labels=["x" * 41]), "INVALID_ARGUMENT",
         "41 characters; the limit is 40"),
        (pb.ClassifyRequest(model="ovlora", images=one, labels=["a"], templates=["no placeholder"]),
         "INVALID_ARGUMENT", "exactly once"),
        (pb.ClassifyRequest(model="ovlora", images=one, labels=["a"], templates=["{} {}"]), "INVALID_ARGUMENT",
         "exactly once"),
        (pb.ClassifyRequest(model="ovlora", images=one, labels=["a"], templates=["{}", "a {}", "the {}"]),
         "INVALID_ARGUMENT", "3 templates; the limit is 2"),
        (pb.ClassifyRequest(model="ovlora", images=one, templates=["{}"]), "INVALID_ARGUMENT", "templates go with labels"),
        (pb.EmbedRequest(model="ovlora"), "INVALID_ARGUMENT", "nothing to embed"),
        (pb.EmbedRequest(model="ovlora", texts=["y" * 41]), "INVALID_ARGUMENT", "41 characters"),
        (pb.EmbedRequest(model="ovlora", texts=["a", "b", "c", "d"]), "INVALID_ARGUMENT", "4 texts"),
        (pb.EmbedRequest(model="missing", texts=["a"]), "NOT_FOUND", "not found"),
    ]
    async with in_process_gateway(triton.grpc_url, exported["repository"], max_labels=3, max_templates=2,
                                  max_label_chars=40) as (_, stub):
        for request, code, message in cases:
            method = stub.Embed if isinstance(request, pb.EmbedRequest) else stub.Classify
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await method(request, timeout=30)
            assert caught.value.code().name == code and message in caught.value.details(), (request, caught.value)


def test_labels_and_templates_fuzzed_never_internal(triton, exported, images) -> None:
    """Through a real gateway process: any labels and templates end OK or INVALID_ARGUMENT."""
    from cliplora.serve.stack.processes import stop_process
    from cliplora.v1 import classifier_pb2_grpc as pb_grpc
    from tests.serving import free_port, wait_for_health

    port = free_port()
    gateway = subprocess.Popen([CLI, "serve", "--triton-url", triton.grpc_url, "--grpc-port", str(port),
                                "--metrics-port", "-1", "--http-port", "0", "--max-labels", "5", "--max-label-chars", "30"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: Counter[str] = Counter()
    try:
        asyncio.run(wait_for_health(port, "SERVING", timeout_s=60))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.ClassifierStub(channel)
        one = [pb.Image(encoded=images[0].read_bytes())]

        clean = st.text(min_size=1, max_size=20).filter(lambda s: s.strip() and "\n" not in s and "\r" not in s)

        @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
        @given(labels=st.one_of(st.lists(st.text(max_size=40), max_size=7),  # anything
                                st.lists(clean, min_size=1, max_size=5, unique=True)),  # valid
               templates=st.one_of(st.lists(st.text(max_size=20), max_size=3),
                                   st.lists(clean.map(lambda s: s.replace("{}", "") + " {}"), max_size=2, unique=True)))
        def one_request(labels: list[str], templates: list[str]) -> None:
            try:
                reply = stub.Classify(pb.ClassifyRequest(model="ovlora", images=one, labels=labels, templates=templates,
                                                         top_k=0), timeout=30)
                code = "OK"
                assert {p.label for p in reply.results[0].predictions} == set(labels or CLASSES)
            except grpc.RpcError as exc:
                code = exc.code().name
            event(code)
            seen[code] += 1
            assert code in {"OK", "INVALID_ARGUMENT"}, (code, labels, templates)

        one_request()
        channel.close()
    finally:
        stop_process(gateway, 20)
    print(f"\nfuzzed labels/templates: {dict(seen)}")
    assert seen["OK"] and seen["INVALID_ARGUMENT"], seen


# -- command line ----------------------------------------------------------------------------

async def test_predict_classify_and_embed_commands(triton, exported, images, tmp_path) -> None:
    labels_file = tmp_path / "labels.json"
    labels_file.write_text(json.dumps(UNSEEN))
    local = predict_files(exported["repository"], "ovlora", images, top_k=0, labels=UNSEEN)
    async with in_process_gateway(triton.grpc_url, exported["repository"]) as (gateway, _):
        target = f"127.0.0.1:{gateway.port}"

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)

        done = await asyncio.to_thread(run, "classify", "--target", target, "--model", "ovlora", "--top-k", "0",
                                       "--labels-file", str(labels_file), *map(str, images))
        assert done.returncode == 0, done.stderr
        remote = json.loads(done.stdout)
        for theirs, ours in zip(remote, local, strict=True):
            assert [p["label"] for p in theirs["predictions"]] == [p["label"] for p in ours["predictions"]]
            np.testing.assert_allclose([p["logit"] for p in theirs["predictions"]],
                                       [p["logit"] for p in ours["predictions"]], atol=1e-5)
        predicted = await asyncio.to_thread(run, "predict", "--repository", str(exported["repository"]), "--name",
                                            "ovlora", "--labels", "wolf, fox", "--template", "{}", str(images[0]))
        assert predicted.returncode == 0, predicted.stderr
        assert {p["label"] for p in json.loads(predicted.stdout)[0]["predictions"]} == {"wolf", "fox"}
        embedded = await asyncio.to_thread(run, "embed", "--target", target, "--model", "ovlora", "--text", "a wolf",
                                           "--text", "a fox", str(images[0]))
        assert embedded.returncode == 0, embedded.stderr
        entries = json.loads(embedded.stdout)
        assert [next(iter(e)) for e in entries] == ["image", "text", "text"]
        assert entries[0]["image"] == str(images[0]) and [e.get("text") for e in entries[1:]] == ["a wolf", "a fox"]
        assert all(len(e["embedding"]) == 32 for e in entries)
        refused = await asyncio.to_thread(run, "classify", "--target", target, "--model", "plain", "--labels", "a,b",
                                          str(images[0]))
        assert refused.returncode == 1 and "FAILED_PRECONDITION" in refused.stderr and "--open-vocabulary" in refused.stderr
        offline = await asyncio.to_thread(run, "predict", "--repository", str(exported["repository"]), "--name",
                                          "plain", "--labels", "a,b", str(images[0]))
        assert offline.returncode == 1 and "FAILED_PRECONDITION" in offline.stderr


async def test_evaluate_against_labels_the_model_was_not_exported_with(triton, exported, tmp_path) -> None:
    """evaluate --labels-file: held-out classes scored at request time, in process and
    through the gateway alike."""
    from cliplora.core.datasets import read_labelled_images
    from cliplora.evaluate import evaluate_model

    data_root = tmp_path / "data"
    for offset, label in enumerate(("wolf", "fox")):
        (data_root / label).mkdir(parents=True)
        for i in range(3):
            factories.make_image(50, 40, seed=100 * offset + i).save(data_root / label / f"{i}.png")
    data = read_labelled_images(data_root)
    in_process = evaluate_model(data, "ovlora", repository=exported["repository"], labels=["fox", "wolf", "bear"])
    async with in_process_gateway(triton.grpc_url, exported["repository"]) as (gateway, _):
        through = await asyncio.to_thread(evaluate_model, data, "ovlora", target=f"127.0.0.1:{gateway.port}",
                                          labels=["fox", "wolf", "bear"])
    assert in_process["images"] == through["images"] == 6
    assert in_process["per_class"] == through["per_class"] and in_process["top1"] == through["top1"]
    with pytest.raises(InvalidArgument, match="not classes of the model"):
        evaluate_model(data, "ovlora", repository=exported["repository"], labels=["bear"])


def test_contract_names() -> None:
    assert contract.text_model_name("pets") == "pets_text"


async def test_loadtest_sends_request_time_labels(triton, exported, tmp_path) -> None:
    """`--models M,M:labels,M:labels-cold --labels-file F`: the fixed head, warm labels and
    always-new labels interleaved against one model; no errors, every entry measured."""
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("wolf\nfox\nbear\n")
    async with in_process_gateway(triton.grpc_url, exported["repository"]) as (gateway, _):
        command = [CLI, "loadtest", "--target", f"127.0.0.1:{gateway.port}", "--models",
                   "ovlora,ovlora:labels,ovlora:labels-cold", "--labels-file", str(labels_file), "--requests", "30",
                   "--warmup", "0", "--report", str(tmp_path / "report"), "--quiet"]
        done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        misses = gateway.metrics.registry.get_sample_value("cliplora_gateway_text_cache_misses_total",
                                                          {"model": "ovlora"})
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["models"]) == {"ovlora", "ovlora:labels", "ovlora:labels-cold"}
    assert all(m["requests"] == 10 and m["errors"] == 0 for m in report["models"].values()), report["models"]
    assert set(report["ratios"]) == {"ovlora:labels/ovlora", "ovlora:labels-cold/ovlora"}
    # the model's two templates: warm, six prompts once; cold, six new prompts in each of its ten requests
    assert misses == 6 + 6 * 10
    bad = subprocess.run([CLI, "loadtest", "--target", "127.0.0.1:1", "--models", "ovlora:labels", "--report",
                          str(tmp_path / "r2")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "needs --labels-file" in bad.stderr


def test_text_encoder_throughput_tool(triton) -> None:
    from cliplora.loadtest.text_throughput import measure

    report = asyncio.run(measure(triton.grpc_url, "ovlora_text", batch=4, concurrency=2, seconds=1.0, warmup=0.2))
    assert report["requests"] > 0 and report["prompts_per_s"] == pytest.approx(
        report["requests"] * 4 / report["seconds"], rel=0.05)
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
