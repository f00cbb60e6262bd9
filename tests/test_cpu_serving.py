"""CPU serving: the `--target cpu-int8` export and its accuracy gate, ONNX Runtime settings
as model parameters (threads, spinning), and the choice of execution provider."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from tritonclient.grpc import model_config_pb2

from cliplora.core import runtime
from cliplora.core.errors import FailedPrecondition, InvalidArgument
from cliplora.core.manifest import Manifest
from cliplora.export import model_config, quantize
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.predict import predict_files
from cliplora.serve.stack.triton_launcher import LocalTriton
from cliplora.v1 import classifier_pb2 as pb
from tests import factories
from tests.factories import tree_snapshot
from tests.serving import CLASSES, in_process_gateway, triton_ports

CLI = str(Path(sys.executable).with_name("cliplora"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu-int8")
    classes = factories.write_classes(root / "classes.txt", CLASSES)
    lora = factories.write_paper_checkpoint(root / "lora.pt", encoder="both", position="all", params=("q", "v"))
    return root, classes, lora


def _options(inputs, tiny_config, repository: Path, **overrides) -> ExportOptions:
    root, classes, lora = inputs
    settings = dict(model=str(tiny_config), pretrained=None, lora=str(lora), classes=classes, templates=(),
                    name="int8", repository=repository, allow_random_weights=True, probes=8, target="cpu-int8")
    settings.update(overrides)
    # cpu-int8 without --calibration images is asked for explicitly (tests/test_export_int8_gate.py)
    settings.setdefault("uncalibrated", settings["target"] == "cpu-int8" and settings.get("calibration") is None)
    return ExportOptions(**settings)


@pytest.fixture(scope="module")
def int8(inputs, tiny_config):
    root = inputs[0]
    calibration = root / "calibration"
    for i in range(6):
        (calibration / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        factories.make_image(40 + 5 * i, 30 + 3 * i, seed=70 + i).save(calibration / f"class{i % 2}" / f"{i}.png")
    repository = root / "repo"
    return {
        "int8": run_export(_options(inputs, tiny_config, repository, calibration=calibration)),
        "fp32": run_export(_options(inputs, tiny_config, repository, name="fp32", target="portable")),
        "repository": repository,
    }


def test_the_int8_graph_keeps_the_contract_and_records_its_gate(int8) -> None:
    result = int8["int8"]
    manifest = Manifest.read(result.path / "manifest.json")
    assert manifest.precision == "int8" and manifest.target == "cpu-int8"
    quantization = manifest.quantization
    assert quantization is not None and quantization.method == "dynamic" and quantization.per_channel
    gate = quantization.gate
    assert gate is not None and gate.passed and gate.images == 8 + 6 and gate.calibration_images == 6
    assert 0 < gate.max_abs_logit <= gate.tolerance_abs_logit == pytest.approx(2e-2 / 0.07, rel=1e-6)
    assert gate.top1_agreement > 0 and gate.min_top1_margin >= 0 and gate.mean_abs_logit <= gate.max_abs_logit
    assert manifest.verification.passed  # the fp32 graph was verified against the unmerged reference first

    graph = onnx.load(str(result.path / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    (head,) = [node for node in graph.node if "logits" in node.output]
    assert head.op_type == "MatMul"  # the class head stays fp32
    fp32 = onnx.load(str(int8["fp32"].path / "model.onnx")).graph
    for ours, theirs in ((graph.input, fp32.input), (graph.output, fp32.output)):
        assert [(v.name, v.type.tensor_type.elem_type) for v in ours] == [(v.name, v.type.tensor_type.elem_type) for v in theirs]
    assert result.path.joinpath("model.onnx").stat().st_size < int8["fp32"].path.joinpath("model.onnx").stat().st_size

    config = model_config.parse_config((int8["repository"] / "int8" / "config.pbtxt").read_text())
    (group,) = config.instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU and config.parameters["precision"].string_value == "int8"
    assert not config.HasField("optimization")  # no TensorRT for a CPU target


@pytest.mark.slow
def test_the_gate_refuses_a_broken_quantization_and_publishes_nothing(inputs, tiny_config, tmp_path, monkeypatch) -> None:
    """A quantizer that also ruins the head (its weights rounded to a sign): the gate stops
    the export and the repository is byte for byte what it was."""
    repository = tmp_path / "repo"
    run_export(_options(inputs, tiny_config, repository, name="kept", target="portable"))
    before = tree_snapshot(repository)
    real = quantize.quantize

    def broken(fp32_path: Path, int8_path: Path):
        record = real(fp32_path, int8_path)
        model = onnx.load(str(int8_path))
        (head,) = [n for n in model.graph.node if "logits" in n.output]
        weights = {t.name: t for t in model.graph.initializer}
        name = next(i for i in head.input if i in weights)
        values = onnx.numpy_helper.to_array(weights[name])
        weights[name].CopyFrom(onnx.numpy_helper.from_array(
            (np.sign(values) * np.abs(values).mean()).astype(values.dtype), name))
        onnx.save(model, str(int8_path))
        return record

    monkeypatch.setattr(quantize, "quantize", broken)
    with pytest.raises(FailedPrecondition, match="INT8 accuracy gate failed, nothing published: INT8 logits differ"):
        run_export(_options(inputs, tiny_config, repository))
    after = tree_snapshot(repository)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")}


@pytest.mark.parametrize(("images", "agreement", "error", "passes"), [
    (8, 0.75, 0.1, True),  # few images: near-ties may flip (a clear margin cannot, within the bound)
    (8, 1.0, 0.5, False),  # logits moved past the bound
    (120, 0.995, 0.1, True),
    (120, 0.985, 0.1, False),  # 100 or more images: at least 99% must agree
])
def test_the_gate_rules(images, agreement, error, passes) -> None:
    gate = quantize.Gate(images=images, calibration_images=0, tolerance=0.3, top1_agreement=agreement,
                         max_abs_logit=error, mean_abs_logit=error / 3, min_top1_margin=0.01)
    assert (not gate.failures) is passes, gate.failures
    assert gate.record().passed is passes and (gate.record().min_top1_agreement is not None) == (images >= 100)


@pytest.mark.subprocess
def test_options_that_do_not_go_together(inputs, tiny_config, tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="--target cpu-int8 quantizes the fp32 graph.*--precision fp16"):
        _options(inputs, tiny_config, tmp_path, precision="fp16")
    with pytest.raises(InvalidArgument, match="--calibration feeds the INT8 accuracy gate"):
        _options(inputs, tiny_config, tmp_path, target="portable", calibration=tmp_path)
    with pytest.raises(InvalidArgument, match="intra-op-threads must be"):
        _options(inputs, tiny_config, tmp_path, intra_op_threads=-1)
    from cliplora.core.errors import NotFound

    with pytest.raises(NotFound, match="--calibration folder not found"):
        run_export(_options(inputs, tiny_config, tmp_path / "repo", calibration=tmp_path / "missing"))
    root, classes, lora = inputs
    done = subprocess.run([CLI, "export", "--model", str(tiny_config), "--allow-random-weights", "--lora", "none",
                           "--classes", str(classes), "--name", "x", "--repository", str(tmp_path / "r"),
                           "--target", "cpu-int8", "--precision", "fp16", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr and "--precision fp16" in done.stderr


@pytest.mark.triton
async def test_an_int8_model_serves_through_triton_as_predict_computes_it(int8, tmp_path) -> None:
    images = []
    for i, size in enumerate([(64, 48), (40, 90), (33, 33)]):
        path = tmp_path / f"image{i}.png"
        factories.make_image(*size, seed=90 + i).save(path)
        images.append(path)
    expected = predict_files(int8["repository"], "int8", images, top_k=0)
    fp32 = predict_files(int8["repository"], "fp32", images, top_k=0)
    with LocalTriton(int8["repository"], ports=triton_ports()) as triton:
        async with in_process_gateway(triton.grpc_url, int8["repository"]) as (_, stub):
            reply = await stub.Classify(pb.ClassifyRequest(model="int8", top_k=0,
                                                           images=[pb.Image(encoded=p.read_bytes()) for p in images]))
        log = triton.log_path.read_text()
    for result, local, full in zip(reply.results, expected, fp32, strict=True):
        assert [p.index for p in result.predictions] == [p["index"] for p in local["predictions"]]
        np.testing.assert_allclose([p.logit for p in result.predictions], [p["logit"] for p in local["predictions"]],
                                   atol=1e-5, rtol=0)
        by_index = {p["index"]: p["logit"] for p in full["predictions"]}
        differences = [abs(p.logit - by_index[p.index]) for p in result.predictions]
        assert 0 < max(differences) < 2e-2 / 0.07  # INT8, not the fp32 graph, within the gate's bound
    assert "int8/1/model.onnx on ['CPUExecutionProvider']" in log


@pytest.mark.triton
def test_runtime_parameters_reach_the_local_backend(inputs, tiny_config, tmp_path) -> None:
    """--intra-op-threads / --spinning are config parameters the backend reads; unset, no
    model spins; `auto` spins for a model alone in its repository, not for one among several."""
    alone = tmp_path / "alone"
    run_export(_options(inputs, tiny_config, alone, name="solo", target="portable", probes=2, spinning="auto"))
    crowded = tmp_path / "crowded"
    run_export(_options(inputs, tiny_config, crowded, name="one", target="portable", probes=2, spinning="auto"))
    run_export(_options(inputs, tiny_config, crowded, name="default", target="portable", probes=2))
    run_export(_options(inputs, tiny_config, crowded, name="two", target="portable", probes=2, intra_op_threads=1,
                        inter_op_threads=1, spinning="on"))
    config = model_config.parse_config((crowded / "two" / "config.pbtxt").read_text())
    assert {k: v.string_value for k, v in config.parameters.items()}.items() >= {
        "intra_op_thread_count": "1", "inter_op_thread_count": "1", "allow_spinning": "on"}.items()
    plain = model_config.parse_config((crowded / "default" / "config.pbtxt").read_text())
    assert "allow_spinning" not in plain.parameters and "intra_op_thread_count" not in plain.parameters
    lines = {}
    for repository in (alone, crowded):
        with LocalTriton(repository, ports=triton_ports()) as triton:
            lines.update({m: re.search(rf"{m}/1/model.onnx on .*? (\d+) intra-op threads \(spinning (\w+)\)",
                                       triton.log_path.read_text()) for m in ("solo", "one", "two", "default")
                          if (repository / m).exists()})
    assert lines["solo"] and lines["solo"].group(2) == "on"  # auto, alone: spins
    assert lines["one"] and lines["one"].group(2) == "off"  # auto, one of three: does not
    assert lines["default"] and lines["default"].group(2) == "off"  # unset: does not
    assert lines["two"] and lines["two"].groups() == ("1", "on")  # told so


def test_provider_selection_falls_back_to_the_cpu() -> None:
    assert runtime.preferred_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert runtime.preferred_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.preferred_providers("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]
    with pytest.raises(FailedPrecondition, match="no CUDA provider.*cliplora\\[gpu\\]"):
        runtime.preferred_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(InvalidArgument, match="device must be one of auto, cpu, cuda"):
        runtime.preferred_providers("tpu", ["CPUExecutionProvider"])


@pytest.mark.filterwarnings("ignore:Specified provider .CUDAExecutionProvider. is not in available")
def test_a_cuda_provider_that_does_not_start_falls_back_or_refuses(int8, monkeypatch, caplog) -> None:
    """What onnxruntime-gpu does on a host without a usable GPU: it lists CUDA, then builds a
    CPU session. `auto` lands on the CPU (logged); `cuda` is refused, not quietly run on the CPU."""
    model = int8["int8"].path / "model.onnx"
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CUDA, "CPUExecutionProvider"])
    monkeypatch.delenv(runtime.DEVICE_ENV, raising=False)
    with caplog.at_level("WARNING", logger=runtime.__name__):
        session = runtime.create_session(model, device="auto")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert any("did not start" in r.getMessage() for r in caplog.records)
    with pytest.raises(FailedPrecondition, match="could not start its CUDA provider"):
        runtime.create_session(model, device="cuda")
    assert runtime.create_session(model, device="cpu").get_providers() == ["CPUExecutionProvider"]


def test_one_onnx_runtime_wheel_at_a_time(int8) -> None:
    assert runtime.installed_runtimes() == ["onnxruntime"]  # `make install` takes the cpu extra
    session = runtime.create_session(int8["int8"].path / "model.onnx")
    assert session.get_providers() == ["CPUExecutionProvider"]  # no GPU here: auto is the CPU
    runtime.check_installation(["onnxruntime-gpu"])
    with pytest.raises(FailedPrecondition, match="both onnxruntime and onnxruntime-gpu are installed"):
        runtime.check_installation(["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(FailedPrecondition, match="ONNX Runtime is not installed"):
        runtime.check_installation([])

    def only_gpu(name: str) -> object:
        if name != "onnxruntime-gpu":
            raise runtime.metadata.PackageNotFoundError(name)
        return object()

    assert runtime.installed_runtimes(only_gpu) == ["onnxruntime-gpu"]


@pytest.mark.slow
def test_int8_with_open_vocabulary_verifies_the_published_image_embeds(inputs, tiny_config, tmp_path) -> None:
    """cpu-int8 + --open-vocabulary: image_embeds is checked on the INT8 file that is published
    (INT8 noise shows: far above fp32's ~1e-5), against INT8's bound; the text encoder stays fp32."""
    result = run_export(_options(inputs, tiny_config, tmp_path / "repo", name="ov8", open_vocabulary=True, probes=4))
    check = result.manifest.open_vocabulary.verification
    assert check.image_embeds_tolerance_abs_logit == pytest.approx(2e-2 / 0.07, rel=1e-6)
    assert 1e-3 < check.image_label_logit_error <= check.image_embeds_tolerance_abs_logit
    assert check.image_embeds_vs_reference.max_logit_error > 1e-3  # INT8 noise: the INT8 file was measured
    assert check.text_vs_reference.max_logit_error <= 1e-3 and check.passed
    from cliplora.core.manifest import TextEncoderManifest

    assert TextEncoderManifest.read(result.text_path / "manifest.json").precision == "fp32"
