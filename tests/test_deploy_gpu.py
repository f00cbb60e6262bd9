"""`--target gpu` and the live stack: the config parses as Triton's ModelConfig, names only
parameters the ONNX Runtime backend accepts, loads and serves in the local (CPU) Triton;
every dashboard and autoscaling query reads only metrics a live gateway and Triton export
(recording rules and Triton's GPU metrics aside); the image's health-check script."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cliplora.core import contract
from cliplora.export import model_config
from cliplora.serve.gateway.settings import GatewaySettings
from tests import tools
from tests.deploy_checks import (
    DEPLOY,
    GPU_METRICS,
    ROOT,
    TRT_ACCELERATOR_PARAMETERS,
    adapter_queries,
    concrete,
    dashboard_queries,
    metric_names,
    recording_rules,
    scraped_names,
)
from tests.serving import CLASSES, free_port, in_process_gateway, probed, triton_ports

# ---------------------------------------------------------------- `--target gpu`

def _parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_gpu_config_is_a_valid_triton_config() -> None:
    spec = contract.TensorSpec(image_size=224, num_classes=10)
    config = _parse_config(model_config.render_config("pets", spec, "fp32", 32, target="gpu"))
    assert config.instance_group[0].kind == 0  # KIND_AUTO: still portable
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    params = dict(accelerator.parameters)
    assert accelerator.name == "tensorrt" and set(params) <= TRT_ACCELERATOR_PARAMETERS
    assert params["precision_mode"] == "FP16" and params["trt_engine_cache_enable"] == "1"
    assert params["trt_engine_cache_path"] == f"{model_config.TRT_CACHE_ROOT}/pets"
    batches = []
    for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
        match = re.fullmatch(rf"{contract.INPUT_NAME}:(\d+)x224x224x3", params[key])
        assert match, params[key]
        batches.append(int(match.group(1)))
    assert batches == sorted(batches) and batches[0] == 1 and batches[-1] == 32
    warmups = {w.batch_size: w for w in config.model_warmup}
    assert set(warmups) == {1, 32}
    sample = warmups[32].inputs[contract.INPUT_NAME]
    assert list(sample.dims) == [224, 224, 3] and sample.zero_data
    # The portable default is unchanged: no accelerator in fp32, the old one in fp16.
    portable = _parse_config(model_config.render_config("pets", spec, "fp32", 32))
    assert not portable.HasField("optimization") and not portable.model_warmup
    fp16 = dict(_parse_config(model_config.render_config("pets", spec, "fp16", 32)).optimization
                .execution_accelerators.gpu_execution_accelerator[0].parameters)
    assert fp16 == {"precision_mode": "FP16", "max_workspace_size_bytes": "2147483648"}
    one = _parse_config(model_config.render_config("pets", spec, "fp32", 1, target="gpu"))
    assert [w.batch_size for w in one.model_warmup] == [1]


def test_export_cli_takes_target(tmp_path: Path) -> None:
    from cliplora.cli import build_parser

    args = build_parser().parse_args(["export", "--model", "m", "--lora", "none", "--classes", "c", "--name", "n",
                                      "--target", "gpu"])
    assert args.target == "gpu"
    assert build_parser().parse_args(["export", "--model", "m", "--lora", "none", "--classes", "c",
                                      "--name", "n"]).target == "portable"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--model", "m", "--lora", "none", "--classes", "c", "--name", "n",
                                   "--target", "tpu"])


# ---------------------------------------------------------------- the live stack

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> Iterator[dict]:
    """`--target gpu` exports (one with --open-vocabulary: its text encoder gets the GPU blocks
    too) and a portable base export, served by the local Triton."""
    from cliplora.export.pipeline import ExportOptions, run_export
    from cliplora.serve.stack.triton_launcher import LocalTriton
    from tests import factories

    root = tmp_path_factory.mktemp("deploy")
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    lora = factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="all", params=("q", "v"))
    common = dict(model=str(tiny_config), pretrained=None, classes=classes, templates=("a photo of a {}.",),
                  repository=root / "repo", allow_random_weights=True, probes=4)
    results = {
        "base": run_export(ExportOptions(lora="none", name="base", **common)),
        "gpu": run_export(ExportOptions(lora=str(lora), name="gpu", target="gpu", open_vocabulary=True, **common)),
        "gpu-base": run_export(ExportOptions(lora="none", name="gpu-base", target="gpu", **common)),
    }
    triton = LocalTriton(root / "repo", ports=triton_ports())
    triton.start()
    try:
        yield {"root": root, "repository": root / "repo", "triton": triton, "exports": results}
    finally:
        triton.cleanup()


@pytest.mark.triton
def test_gpu_export_is_keyed_and_verified(stack: dict) -> None:
    import onnx

    keys = set()
    for name in ("gpu", "gpu-base"):
        manifest = stack["exports"][name].manifest
        assert manifest.target == "gpu" and manifest.verification.passed
        serving = manifest.gpu_serving  # what the FP16 engine may differ by, stated, not checked here
        assert serving.engine_precision == "fp16" and serving.verified_here is False
        assert serving.expected_tolerance_abs_logit == pytest.approx(5e-3 * manifest.base.logit_scale)
        key = manifest.onnx.tensorrt_engine_key
        assert re.fullmatch(r"head_[0-9a-f]{16}", key)
        graph = onnx.load(str(stack["exports"][name].path / contract.MODEL_FILENAME)).graph
        assert key in {t.name for t in graph.initializer} and "head" not in {t.name for t in graph.initializer}
        keys.add(key)
    # Same architecture, other weights: other engine-cache keys (a shared key would serve one's engine for both).
    assert len(keys) == 2
    from cliplora.core.manifest import TextEncoderManifest

    text = TextEncoderManifest.read(stack["exports"]["gpu"].text_path / contract.MANIFEST_FILENAME)
    assert text.target == "gpu" and text.onnx.tensorrt_engine_key  # the text encoder's engine is keyed too
    assert re.fullmatch(r".+_[0-9a-f]{16}", text.onnx.tensorrt_engine_key) and text.onnx.tensorrt_engine_key not in keys
    assert stack["exports"]["base"].manifest.target == "portable"
    assert "tensorrt_engine_key" not in stack["exports"]["base"].manifest.to_dict()["onnx"]
    config = (stack["repository"] / "gpu-base" / contract.CONFIG_FILENAME).read_text()
    assert config == model_config.render_config("gpu-base", contract.TensorSpec(32, len(CLASSES)), "fp32",
                                                contract.DEFAULT_MAX_BATCH_SIZE, target="gpu")


@pytest.mark.triton
async def test_gpu_config_loads_and_serves_in_the_local_triton(stack: dict) -> None:
    """Triton parses the GPU blocks (they come back in its view of the config), runs the
    warm-up, and the model answers through the gateway exactly as `predict` does."""

    from cliplora.predict import predict_files
    from cliplora.v1 import classifier_pb2 as pb
    from tests import factories

    triton = stack["triton"]
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/gpu/config", timeout=10) as response:
        served = json.loads(response.read())
    accelerator = served["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]
    assert accelerator["name"] == "tensorrt" and accelerator["parameters"]["trt_engine_cache_enable"] == "1"
    assert [w["batch_size"] for w in served["model_warmup"]] == [1, contract.DEFAULT_MAX_BATCH_SIZE]
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/gpu/ready", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/gpu_text/config", timeout=10) as response:
        text = json.loads(response.read())  # the text encoder: its own profile (token ids) and warm-up
    params = text["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]["parameters"]
    assert params["trt_profile_max_shapes"] == f"tokens:{contract.DEFAULT_MAX_BATCH_SIZE}x77"
    assert params["trt_engine_cache_path"].endswith("/gpu_text")
    assert [w["inputs"]["tokens"]["data_type"] for w in text["model_warmup"]] == ["TYPE_INT32"] * 2
    with urllib.request.urlopen(f"{triton.http_url}/v2/models/gpu_text/ready", timeout=10) as response:
        assert response.status == 200

    images = []
    for i, size in enumerate([(64, 48), (40, 90), (120, 120)]):
        path = stack["root"] / f"image{i}.png"
        factories.make_image(*size, seed=20 + i).save(path)
        images.append(path)
    async with in_process_gateway(triton.grpc_url, stack["repository"]) as (_gateway, stub):
        reply = await stub.Classify(pb.ClassifyRequest(
            model="gpu", top_k=0, images=[pb.Image(encoded=p.read_bytes()) for p in images]), timeout=30)
        labelled = await stub.Classify(pb.ClassifyRequest(
            model="gpu", top_k=0, images=[pb.Image(encoded=p.read_bytes()) for p in images],
            labels=["wolf", "fox"]), timeout=30)
    expected = predict_files(stack["repository"], "gpu", images, top_k=0)
    expected_labelled = predict_files(stack["repository"], "gpu", images, top_k=0, labels=["wolf", "fox"])
    for answer, local_answer in ((reply, expected), (labelled, expected_labelled)):
        for result, local in zip(answer.results, local_answer, strict=True):
            assert [p.index for p in result.predictions] == [p["index"] for p in local["predictions"]]
            np.testing.assert_allclose([p.logit for p in result.predictions],
                                       [p["logit"] for p in local["predictions"]], atol=1e-5, rtol=0)


@pytest.mark.triton
async def test_dashboard_and_adapter_use_only_exported_metrics(stack: dict) -> None:
    """Live scrapes of the gateway and the local Triton after real traffic; every metric a
    dashboard or HPA query reads is there, or is a recording rule, or is a GPU metric."""
    import grpc

    from cliplora.v1 import classifier_pb2 as pb
    from tests import factories

    triton = stack["triton"]
    prometheus = None
    try:
        async with in_process_gateway(triton.grpc_url, stack["repository"], max_images=4) as (gateway, stub):
            image = stack["root"] / "traffic.jpg"
            factories.make_image(80, 60, seed=3).save(image)
            ok = pb.Image(encoded=image.read_bytes())
            for model in ("base", "gpu"):
                await stub.Classify(pb.ClassifyRequest(model=model, images=[ok]), timeout=30)
            await stub.Classify(pb.ClassifyRequest(model="gpu", images=[ok], labels=["wolf"]), timeout=30)
            with pytest.raises(grpc.aio.AioRpcError):  # an error, so that the error series exist
                await stub.Classify(pb.ClassifyRequest(model="missing", images=[ok]), timeout=30)

            def scrape(url: str) -> set[str]:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return scraped_names(response.read().decode())

            exported = scrape(f"http://127.0.0.1:{gateway.metrics_port}/metrics") | scrape(triton.metrics_url)
            allowed = exported | recording_rules() | GPU_METRICS
            queries = dashboard_queries() + [("prometheus-adapter", q) for q in adapter_queries()]
            for title, expr in queries:
                missing = metric_names(concrete(expr)) - allowed
                assert not missing, f"{title}: {sorted(missing)} are not exported (query: {expr})"
            assert GPU_METRICS.isdisjoint(exported)  # this Triton has no GPU: the allowlist is needed, and only for these

            # Every query also parses and evaluates in a real Prometheus that loads our rules.
            from cliplora.serve.stack.prometheus import LocalPrometheus

            tools.require("prometheus")  # where it skips, the queries were checked by name only
            config = textwrap.dedent(f"""\
                global:
                  scrape_interval: 1s
                  evaluation_interval: 1s
                rule_files: ['{DEPLOY / "prometheus" / "rules.yml"}']
                scrape_configs:
                  - job_name: cliplora-gateway
                    static_configs: [{{targets: ['127.0.0.1:{gateway.metrics_port}']}}]
                  - job_name: triton
                    static_configs: [{{targets: ['127.0.0.1:{triton.ports.metrics}']}}]
                """)
            prometheus = LocalPrometheus(config, port=free_port()).start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # wait for the first scrape of both targets
                result = _query(prometheus.url, "count(up == 1)")
                if result["data"]["result"] and result["data"]["result"][0]["value"][1] == "2":
                    break
                await asyncio.sleep(0.5)
            else:
                pytest.fail("Prometheus did not scrape the gateway and Triton")
            for title, expr in queries:
                result = _query(prometheus.url, concrete(expr))
                assert result["status"] == "success", (title, result)
            # The scraped names are the ones Prometheus stores (no renaming on the way).
            stored = set(_get(f"{prometheus.url}/api/v1/label/__name__/values")["data"])
            assert {"cliplora_gateway_model_info", "nv_inference_queue_duration_us"} <= stored
    finally:
        if prometheus is not None:
            prometheus.cleanup()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _query(base: str, expr: str) -> dict:
    try:
        return _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    except urllib.error.HTTPError as exc:  # a parse error answers 400 with the reason
        return json.loads(exc.read())


@pytest.mark.triton
async def test_container_health_check_script(stack: dict) -> None:
    from cliplora.serve.gateway.server import GatewayServer

    script = DEPLOY / "docker" / "grpc_health_check.py"
    async with in_process_gateway(stack["triton"].grpc_url, metrics_port=-1) as (gateway, _stub):

        async def check(target: str) -> int:
            process = await asyncio.create_subprocess_exec(sys.executable, str(script), target,
                                                           stdout=asyncio.subprocess.DEVNULL,
                                                           stderr=asyncio.subprocess.DEVNULL,
                                                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            return await asyncio.wait_for(process.wait(), timeout=30)

        assert await check(f"127.0.0.1:{gateway.port}") == 0
        assert await check(f"127.0.0.1:{free_port()}") == 1  # nothing listening
    # Triton unreachable: the gateway answers NOT_SERVING, and the check fails.
    lonely = GatewayServer(GatewaySettings(grpc_port=0, metrics_port=-1, triton_url=f"127.0.0.1:{free_port()}",
                                           health_interval_s=0.2))
    await lonely.start()
    try:
        await probed(lonely)
        process = await asyncio.create_subprocess_exec(sys.executable, str(script), f"127.0.0.1:{lonely.port}",
                                                       stdout=asyncio.subprocess.DEVNULL,
                                                       stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 1 and b"NOT_SERVING" in stderr
    finally:
        await lonely.stop(1)
