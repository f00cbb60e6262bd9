"""The real thing: tritonserver + the gateway on free ports, tiny exported models."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from cliplora.export import model_config
from cliplora.predict import predict_files
from cliplora.serve.stack.triton_launcher import LocalTriton
from cliplora.v1 import classifier_pb2 as pb
from tests import factories
from tests.serving import (
    CLASSES,
    encoded,
    free_port,
    health,
    in_process_gateway,
    listening,
    metrics_text,
    png_header,
    probed,
    smooth_png,
    triton_ports,
)


@pytest.fixture(scope="module")
def repository(tiny_repository) -> Path:
    return tiny_repository


@pytest.fixture(scope="module")
def triton(tiny_triton):
    return tiny_triton


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, (fmt, mode, size) in enumerate([("jpg", "RGB", (64, 48)), ("png", "RGBA", (40, 90)), ("gif", "P", (120, 120)),
                                            ("webp", "RGB", (33, 77)), ("bmp", "L", (50, 50))]):
        path = root / f"img{i}.{fmt}"
        factories.make_image(*size, mode=mode, seed=10 + i).save(path)
        paths.append(path)
    return paths


async def test_classify_equals_predict(triton, repository, images) -> None:
    async with in_process_gateway(triton.grpc_url, repository) as (_, stub):
        for model in ("base", "lora"):
            reply = await stub.Classify(pb.ClassifyRequest(
                model=model, top_k=0, images=[pb.Image(encoded=p.read_bytes()) for p in images]), timeout=30)
            expected = predict_files(repository, model, images, top_k=0)
            assert reply.model == model and reply.version == 1
            for result, local in zip(reply.results, expected, strict=True):
                got = [(p.label, p.index) for p in result.predictions]
                assert got == [(p["label"], p["index"]) for p in local["predictions"]]
                np.testing.assert_allclose([p.logit for p in result.predictions],
                                           [p["logit"] for p in local["predictions"]], atol=1e-5, rtol=0)
        base = await stub.Classify(pb.ClassifyRequest(model="base", top_k=0, images=[pb.Image(encoded=images[0].read_bytes())]))
        lora = await stub.Classify(pb.ClassifyRequest(model="lora", top_k=0, images=[pb.Image(encoded=images[0].read_bytes())]))
        base_logits = {p.index: p.logit for p in base.results[0].predictions}
        assert max(abs(p.logit - base_logits[p.index]) for p in lora.results[0].predictions) > 1e-3


async def test_list_models_and_metrics(triton, repository) -> None:
    async with in_process_gateway(triton.grpc_url, repository) as (gateway, stub):
        reply = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        by_name = {m.name: m for m in reply.models}
        assert set(by_name) == {"base", "lora"}
        lora = by_name["lora"]
        assert list(lora.versions) == [1] and lora.num_classes == len(CLASSES) and lora.image_size == 32
        assert lora.lora_format == "clip-lora" and json.loads(lora.lora_json)["scaling"] == "alpha/sqrt(r)"
        assert by_name["base"].lora_format == "none" and lora.weights == "random"
        text = metrics_text(gateway.metrics_port)
        assert 'cliplora_gateway_request_duration_seconds_count{code="OK",method="ListModels"' in text
        assert "cliplora_gateway_triton_ready 1.0" in text


async def test_every_error_row_from_real_requests(triton, repository, images) -> None:
    jpeg = encoded(factories.make_image(200, 150, seed=5), "JPEG")
    ok = pb.Image(encoded=images[0].read_bytes())
    cases = [
        (pb.ClassifyRequest(model="lora", images=[pb.Image(encoded=b"\x00garbage\xff" * 10)]), "INVALID_ARGUMENT"),
        (pb.ClassifyRequest(model="lora", images=[pb.Image(encoded=jpeg[: len(jpeg) // 2])]), "INVALID_ARGUMENT"),
        (pb.ClassifyRequest(model="lora", images=[ok] * 5), "INVALID_ARGUMENT"),
        (pb.ClassifyRequest(model="lora", images=[pb.Image(encoded=png_header(60000, 60000))]), "INVALID_ARGUMENT"),
        (pb.ClassifyRequest(model="lora", images=[ok], top_k=-2), "INVALID_ARGUMENT"),
        (pb.ClassifyRequest(model="missing", images=[ok]), "NOT_FOUND"),
        (pb.ClassifyRequest(model="lora", version=9, images=[ok]), "NOT_FOUND"),
    ]
    async with in_process_gateway(triton.grpc_url, repository, max_images=4) as (_, stub):
        for request, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Classify(request, timeout=30)
            assert caught.value.code().name == code, (request.model, caught.value.details())
        reply = await stub.Classify(pb.ClassifyRequest(model="lora", images=[ok]), timeout=30)
        assert len(reply.results) == 1


async def test_a_deadline_shorter_than_the_work_ends_in_the_gateway(triton, repository) -> None:
    """The call reaches the gateway, whose decoding (four 49-megapixel PNGs, one after another
    on one decoding worker: seconds on any machine) outlasts the 0.5 s deadline: the gateway
    counts it as DEADLINE_EXCEEDED (its own metric, not just the client's verdict), lets go of
    it, and answers the next call. That
    the deadline also bounds the wait on Triton is tests/test_faults.py's slow-Triton test."""
    huge = pb.Image(encoded=smooth_png(7000, 7000))
    async with in_process_gateway(triton.grpc_url, repository, preprocess_workers=1) as (gateway, stub):
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(pb.ClassifyRequest(model="lora", images=[huge] * 4), timeout=0.5)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        counted = {"model": "lora", "version": "1", "method": "Classify", "code": "DEADLINE_EXCEEDED"}
        deadline = time.monotonic() + 10
        while gateway.metrics.registry.get_sample_value("cliplora_gateway_request_duration_seconds_count", counted) != 1:
            assert time.monotonic() < deadline, metrics_text(gateway.metrics_port)
            await asyncio.sleep(0.05)
        assert gateway.service.admission.in_flight == 0
        reply = await stub.Classify(pb.ClassifyRequest(model="lora", images=[pb.Image(encoded=_small_jpeg())]),
                                    timeout=30)
        assert len(reply.results) == 1
        print(f"\ndeadline 0.5 s: DEADLINE_EXCEEDED counted by the gateway, next call OK "
              f"{time.monotonic() - started:.2f} s after the first began")


def _small_jpeg() -> bytes:
    return encoded(factories.make_image(64, 48, seed=1), "JPEG")


async def test_oversized_requests_per_image_and_per_message(triton, repository) -> None:
    """An image over --max-image-bytes in a message the gRPC layer accepts: INVALID_ARGUMENT
    from the gateway, naming the limit. A whole message over the gRPC receive limit
    (max_images x (max_image_bytes + 1 KiB) + 64 KiB): RESOURCE_EXHAUSTED from gRPC itself,
    before any handler runs (as the README's table says)."""
    async with in_process_gateway(triton.grpc_url, repository, max_images=2, max_image_bytes=50_000) as (gateway, stub):
        limit = gateway.settings.max_message_bytes
        assert limit == 2 * (50_000 + 1024) + (1000 + 32) * (4 * 300 + 16) + 64 * 1024
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(pb.ClassifyRequest(model="lora", images=[pb.Image(encoded=b"\xff" * 60_000)]), timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "image 0 has 60000 bytes; the limit is 50000" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(pb.ClassifyRequest(model="lora", images=[pb.Image(encoded=b"\xff" * (limit + 1))]),
                                timeout=30)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in caught.value.details()
        reply = await stub.Classify(pb.ClassifyRequest(model="lora", images=[pb.Image(encoded=_small_jpeg())] * 2))
        assert len(reply.results) == 2  # and the gateway carries on


@pytest.mark.triton
async def test_new_exports_appear_without_restart(tmp_path, tiny_config, images) -> None:
    """Export while serving: Triton polls the repository, the gateway rediscovers it."""
    from cliplora.export.pipeline import ExportOptions, run_export

    repository = tmp_path / "repo"
    repository.mkdir()
    with LocalTriton(repository, ports=triton_ports(), poll_seconds=1) as server:
        async with in_process_gateway(server.grpc_url, refresh_interval_s=0.5) as (_, stub):
            assert list((await stub.ListModels(pb.ListModelsRequest())).models) == []
            classes = factories.write_classes(tmp_path / "classes.txt", CLASSES)
            options = ExportOptions(model=str(tiny_config), pretrained=None, lora="none", classes=classes,
                                    templates=("a photo of a {}.",), name="fresh", repository=repository,
                                    allow_random_weights=True, probes=2)
            await asyncio.get_running_loop().run_in_executor(None, run_export, options)
            request = pb.ClassifyRequest(model="fresh", images=[pb.Image(encoded=images[0].read_bytes())])
            deadline = time.monotonic() + 20
            while True:
                try:
                    reply = await stub.Classify(request, timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.NOT_FOUND, exc.details()
                    assert time.monotonic() < deadline, "the new model never appeared"
                    await asyncio.sleep(0.3)
            assert reply.model == "fresh" and reply.version == 1


async def test_concurrent_clients(triton, images) -> None:
    payloads = [p.read_bytes() for p in images]
    async with in_process_gateway(triton.grpc_url) as (_, stub):
        single = {}
        for i, data in enumerate(payloads):
            reply = await stub.Classify(pb.ClassifyRequest(model="lora", top_k=0, images=[pb.Image(encoded=data)]))
            single[i] = [(p.index, round(p.logit, 4)) for p in reply.results[0].predictions]
        calls = [stub.Classify(pb.ClassifyRequest(model="lora", top_k=0, images=[pb.Image(encoded=payloads[i % 5])]),
                               timeout=60) for i in range(40)]
        replies = await asyncio.gather(*calls)
        for i, reply in enumerate(replies):
            assert [(p.index, round(p.logit, 4)) for p in reply.results[0].predictions] == single[i % 5]


async def test_shutdown_with_calls_in_flight_loses_none(triton, images) -> None:
    """Calls of both doors in flight at the stop: every one answered, none lost."""
    import base64

    import aiohttp

    # Large photos: decoding and resizing 48 of them keeps the calls busy for a while.
    photos = [encoded(factories.make_image(2000, 1500, seed=s), "JPEG") for s in range(4)]
    request = pb.ClassifyRequest(model="lora", images=[pb.Image(encoded=p) for p in photos])
    # The HTTP calls get twice the photos: still running well after the door would close if
    # the stop closed it before the drain.
    body = {"model": "lora", "images": [{"b64": base64.b64encode(p).decode()} for p in photos * 2]}
    http_port = free_port()
    async with in_process_gateway(triton.grpc_url, http_port=http_port) as (gateway, stub), \
            aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as http:
        async def over_http() -> tuple[int, object]:
            async with http.post("/v1/classify", json=body) as answer:
                return answer.status, await answer.json()

        http_calls = [asyncio.ensure_future(over_http()) for _ in range(6)]
        calls = [asyncio.ensure_future(stub.Classify(request, timeout=60)) for _ in range(6)]
        deadline = time.monotonic() + 10
        while gateway.service.admission.accepted < len(calls) + len(http_calls):  # every call has arrived
            assert time.monotonic() < deadline, gateway.service.admission.accepted
            await asyncio.sleep(0.002)
        in_flight_at_stop = gateway.service.admission.in_flight
        stopping = asyncio.ensure_future(gateway.stop(grace=20))
        replies = await asyncio.gather(*calls, return_exceptions=True)
        http_replies = await asyncio.gather(*http_calls, return_exceptions=True)
        await stopping
        assert in_flight_at_stop > 0
        assert all(isinstance(r, pb.ClassifyResponse) and len(r.results) == 4 for r in replies), replies
        assert all(isinstance(r, tuple) and r[0] == 200 and len(r[1]) == 8 for r in http_replies), http_replies
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(request, timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(aiohttp.ClientConnectionError):  # the door is closed
            await over_http()


async def test_health_without_triton_is_not_serving() -> None:
    """No Triton at all: NOT_SERVING, and a call is UNAVAILABLE (the README's "Triton down"),
    not NOT_FOUND: without Triton nobody can tell whether the model exists."""
    async with in_process_gateway(f"127.0.0.1:{free_port()}", wait_serving=False) as (gateway, stub):
        await probed(gateway)
        assert await health(gateway.port) == "NOT_SERVING"
        for request in (pb.ClassifyRequest(model="base", images=[pb.Image(encoded=b"x")]),
                        pb.ClassifyRequest(model="base", version=3, images=[pb.Image(encoded=b"x")])):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Classify(request, timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert "Triton is unavailable" in caught.value.details()



def test_backend_answers_errors_without_dying(triton, repository, tmp_path) -> None:
    """A model whose config lies about its input size: errors, and the instance keeps serving."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    broken = repository / "broken"
    shutil.copytree(repository / "base", broken)
    config = model_config.parse_config((broken / "config.pbtxt").read_text())
    config.name = "broken"
    config.input[0].dims[:] = [16, 16, 3]
    (broken / "config.pbtxt").write_text(model_config.to_text(config))
    client = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    try:
        deadline = time.monotonic() + 30
        while not client.is_model_ready("broken"):
            assert time.monotonic() < deadline, triton.log_tail()
            time.sleep(0.3)
        for _ in range(3):
            image = httpclient.InferInput("image", [1, 16, 16, 3], "UINT8")
            image.set_data_from_numpy(np.zeros((1, 16, 16, 3), dtype=np.uint8))
            with pytest.raises(InferenceServerException, match="onnxruntime backend"):
                client.infer("broken", [image])
        assert client.is_model_ready("broken")
        good = httpclient.InferInput("image", [2, 32, 32, 3], "UINT8")
        good.set_data_from_numpy(np.zeros((2, 32, 32, 3), dtype=np.uint8))
        assert client.infer("base", [good]).as_numpy("logits").shape == (2, len(CLASSES))
    finally:
        shutil.rmtree(broken)
        client.close()


@pytest.mark.triton
def test_classify_cli_and_serve_stack_end_to_end(repository, images, tmp_path) -> None:
    """`cliplora serve` as a user runs it (own ports, the gateway on every interface with
    --host 0.0.0.0), `cliplora classify`, then Ctrl-C. Triton's three ports and Prometheus
    stay on loopback whatever --host says; the gateway's three ports follow it. The HTTP
    door answers what `cliplora classify` prints, to the bit, and the playground's address
    is printed."""
    grpc_port, metrics_port, prometheus_port, http_port = free_port(), free_port(), free_port(), free_port()
    ports = triton_ports()
    script = str(Path(sys.executable).with_name("cliplora"))
    stack = subprocess.Popen(
        [script, "serve", "--repository", str(repository), "--host", "0.0.0.0", "--grpc-port", str(grpc_port),
         "--metrics-port", str(metrics_port), "--triton-ports", f"{ports.http},{ports.grpc},{ports.metrics}",
         "--prometheus-port", str(prometheus_port), "--http-port", str(http_port), "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert stack.poll() is None, stack.stdout.read()
            assert time.monotonic() < deadline, "stack did not become ready"
            try:
                if asyncio.run(health(grpc_port)) == "SERVING":
                    break
            except grpc.aio.AioRpcError:
                pass
            time.sleep(0.3)
        sockets = listening(stack.pid)
        for port in (ports.http, ports.grpc, ports.metrics, prometheus_port):
            assert sockets.get(port) == {"127.0.0.1"}, (port, sockets)
        for port in (grpc_port, metrics_port, http_port):  # every interface: gRPC makes 0.0.0.0 a dual-stack "::"
            assert sockets.get(port) and sockets[port] <= {"0.0.0.0", "::"}, (port, sockets)
        done = subprocess.run([script, "classify", "--target", f"127.0.0.1:{grpc_port}", "--model", "lora",
                               "--top-k", "0", *map(str, images[:2])], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        remote = json.loads(done.stdout)
        local = predict_files(repository, "lora", images[:2], top_k=0)
        assert [r["image"] for r in remote] == [str(p) for p in images[:2]]
        over_http = _classify_over_http(http_port, "lora", images[:2])
        assert [r["predictions"] for r in over_http] == [r["predictions"] for r in remote]
        for theirs, ours in zip(remote, local, strict=True):
            np.testing.assert_allclose([p["logit"] for p in theirs["predictions"]], [p["logit"] for p in ours["predictions"]],
                                       atol=1e-5)
        failed = subprocess.run([script, "classify", "--target", f"127.0.0.1:{grpc_port}", "--model", "nope",
                                 str(images[0])], capture_output=True, text=True, timeout=60)
        assert failed.returncode == 1 and "NOT_FOUND" in failed.stderr and failed.stdout == ""
    finally:
        stack.send_signal(signal.SIGINT)
        try:
            output, _ = stack.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            stack.kill()
            raise
    assert stack.returncode == 0, output
    assert "stopped" in output
    assert "Ctrl-C stops everything" in output
    assert f"playground                                                http://0.0.0.0:{http_port}/" in output
    leftover = subprocess.run(["pgrep", "-f", f"--grpc-port={ports.grpc}"], capture_output=True, text=True)
    assert leftover.stdout == "", "tritonserver still running"


def _classify_over_http(port: int, model: str, paths: list[Path]) -> list[dict]:
    """What `curl -F model=... -F image=@...` does: a multipart POST to /v1/classify."""
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'.encode(),
             f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n0\r\n'.encode()]
    for path in paths:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/classify", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Cliplora-Model"] == model
        answer = json.loads(response.read())
    assert [r["image"] for r in answer] == [p.name for p in paths]
    return answer
