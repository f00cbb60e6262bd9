"""`export` end to end on tiny models: the published graph is the adapted classifier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from tritonclient.grpc import model_config_pb2

from cliplora.core import contract
from cliplora.core.errors import (
    CliploraError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from cliplora.core.runtime import create_session, run_logits
from cliplora.export import model_config, verify
from cliplora.export.pipeline import ExportOptions, run_export
from cliplora.model import head
from cliplora.model.adapters import load_adapter
from cliplora.model.merge import merge_adapter
from cliplora.model.reference import build_reference
from tests import factories
from tests.factories import tree_snapshot

FP16_BOUND = 5e-3 / 0.07  # 5e-3 x the tiny model's logit scale 1/0.07: 0.0714286


def _options(tmp_path: Path, tiny_config: Path, classes_file: Path, lora: str, **kwargs) -> ExportOptions:
    defaults = dict(
        model=str(tiny_config),
        pretrained=None,
        lora=lora,
        classes=classes_file,
        templates=("a photo of a {}.",),
        name="tiny",
        repository=tmp_path / "repo",
        allow_random_weights=True,
        probes=6,
    )
    defaults.update(kwargs)
    return ExportOptions(**defaults)


@pytest.fixture()
def paper_lora(tmp_path: Path) -> str:
    return str(factories.write_paper_checkpoint(tmp_path / "lora.pt", encoder="both", params=("q", "k", "v", "o"), position="all"))


def _independent_logits(tiny_base, adapter, classes, templates, crops: np.ndarray) -> np.ndarray:
    """The adapted classifier computed by hand, in PyTorch, from the uint8 crops."""
    reference = build_reference(tiny_base.model, adapter)
    with torch.no_grad():
        texts = []
        for name in classes:
            tokens = tiny_base.tokenizer([t.replace("{}", name.replace("_", " ")) for t in templates])
            texts.append(F.normalize(F.normalize(reference.encode_text(tokens), dim=-1).mean(0), dim=-1))
        text = torch.stack(texts)
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor(tiny_base.mean).view(1, 3, 1, 1)
        std = torch.tensor(tiny_base.std).view(1, 3, 1, 1)
        image = F.normalize(reference.encode_image((x - mean) / std), dim=-1)
        return (tiny_base.logit_scale * image @ text.t()).numpy()


@pytest.mark.slow
def test_export_publishes_a_verified_adapted_classifier(tmp_path, tiny_config, classes_file, tiny_base, paper_lora) -> None:
    templates = ("a photo of a {}.", "a blurry photo of the {}.")
    result = run_export(_options(tmp_path, tiny_config, classes_file, paper_lora, templates=templates))
    repo = tmp_path / "repo"
    assert result.version == 1 and result.path == repo / "tiny" / "1"
    onnx_path = result.path / contract.MODEL_FILENAME
    onnx.checker.check_model(str(onnx_path), full_check=True)

    graph = onnx.load(str(onnx_path))
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert inp.name == contract.INPUT_NAME and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.name == contract.OUTPUT_NAME and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == [32, 32, 3]
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch

    classes = head.read_classes(classes_file)
    assert (repo / "tiny" / "labels.txt").read_text() == "cat\ndog\nred_panda\ngolden_retriever\n"
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["classes"] == classes and manifest["templates"] == list(templates)
    assert manifest["lora"]["format"] == "clip-lora" and manifest["lora"]["scaling"] == "alpha/sqrt(r)"
    assert manifest["lora"]["sha256"] and manifest["base"]["weights"]["kind"] == "random"
    assert manifest["onnx"]["opset"] == 17 and manifest["onnx"]["onnxruntime_version"]
    check = manifest["verification"]
    assert check["passed"] and check["onnx_vs_reference"]["max_abs_logit"] <= 1e-3
    assert check["onnx_vs_base"]["max_abs_logit"] > 1e-2

    # Independently of the exporter's own verification: fresh images, batch sizes 1 and 5.
    adapter = load_adapter(paper_lora, 12, 12)
    images = [factories.make_image(40 + 13 * i, 30 + 7 * i, seed=100 + i) for i in range(5)]
    crops = verify.product_inputs(images, 32)
    expected = _independent_logits(tiny_base, adapter, classes, templates, crops)
    session = create_session(onnx_path)
    got = run_logits(session, crops)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(run_logits(session, crops[:1]), expected[:1], atol=1e-4, rtol=0)
    # ... and not trivially: the base classifier answers differently.
    base_logits = _independent_logits(tiny_base, None, classes, templates, crops)
    assert np.abs(got - base_logits).max() > 1e-2


def test_wrong_scaling_would_fail_verification(tmp_path, tiny_base, paper_lora) -> None:
    """Had the merge used alpha/r, the unmerged reference would disagree far beyond 1e-3."""
    adapter = load_adapter(paper_lora, 12, 12)
    from dataclasses import replace

    wrong = replace(adapter, updates=tuple(replace(u, scale=u.scale / (2**0.5)) for u in adapter.updates))
    merged_wrong, _ = merge_adapter(tiny_base.model, wrong)
    reference = build_reference(tiny_base.model, adapter)
    images = verify.probe_images(32, 4)
    text = head.class_text_matrix(reference, tiny_base.tokenizer, ["cat", "dog"], ["{}"])
    ref = verify.reference_logits(reference, text, tiny_base.logit_scale, images, 32, tiny_base.mean, tiny_base.std)
    got = verify.reference_logits(merged_wrong, text, tiny_base.logit_scale, images, 32, tiny_base.mean, tiny_base.std)
    assert verify.compare(got, ref).max_abs_logit > 1e-3


def test_peft_adapter_exports(tmp_path, tiny_config, classes_file) -> None:
    folder = factories.write_peft_adapter(tmp_path / "peft", use_rslora=True)
    result = run_export(_options(tmp_path, tiny_config, classes_file, str(folder), name="peft"))
    manifest = result.manifest.to_dict()
    assert manifest["lora"]["format"] == "peft" and manifest["lora"]["scaling"] == "lora_alpha/sqrt(r)"
    assert manifest["verification"]["passed"]


@pytest.mark.slow
def test_base_export_and_versions(tmp_path, tiny_config, classes_file) -> None:
    first = run_export(_options(tmp_path, tiny_config, classes_file, "none", name="base"))
    second = run_export(_options(tmp_path, tiny_config, classes_file, "none", name="base"))
    assert (first.version, second.version) == (1, 2)
    assert first.manifest.to_dict()["lora"] == {"format": "none"} and first.manifest.to_dict()["merge"]["mode"] == "base"
    assert first.manifest.to_dict()["verification"]["onnx_vs_base"] is None
    assert sorted(p.name for p in (tmp_path / "repo" / "base").iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    # Triton takes every folder in the root for a model: only models may be there.
    assert [p.name for p in (tmp_path / "repo").iterdir() if p.is_dir()] == ["base"]


def test_failure_while_publishing_a_new_model_leaves_nothing(tmp_path, tiny_config, classes_file, monkeypatch) -> None:
    from cliplora.export import publish

    def broken_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(publish.os, "rename", broken_rename)
    with pytest.raises(FailedPrecondition, match="could not publish new .*nothing published: disk full"):
        run_export(_options(tmp_path, tiny_config, classes_file, "none", name="new"))
    assert [p.name for p in (tmp_path / "repo").iterdir() if p.is_dir()] == []


@pytest.mark.slow
def test_unmerged_export_keeps_branches_and_agrees(tmp_path, tiny_config, classes_file, paper_lora) -> None:
    merged = run_export(_options(tmp_path, tiny_config, classes_file, paper_lora, name="merged"))
    unmerged = run_export(_options(tmp_path, tiny_config, classes_file, paper_lora, name="unmerged", unmerged=True))
    assert unmerged.manifest.to_dict()["merge"]["mode"] == "unmerged"

    def matmuls(path: Path) -> int:
        return sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(path / "model.onnx")).graph.node)

    # 12 vision blocks x 4 targets x 2 branch matmuls more than the merged graph.
    assert matmuls(unmerged.path) >= matmuls(merged.path) + 12 * 4 * 2
    crops = verify.product_inputs(verify.probe_images(32, 3, seed=9), 32)
    np.testing.assert_allclose(
        run_logits(create_session(unmerged.path / "model.onnx"), crops),
        run_logits(create_session(merged.path / "model.onnx"), crops),
        atol=1e-4,
    )


def test_fp16_export_verifies_within_its_tolerance(tmp_path, tiny_config, classes_file, paper_lora) -> None:
    """fp16 passes within the documented bound, written here, not read from the product."""
    result = run_export(_options(tmp_path, tiny_config, classes_file, paper_lora, name="half", precision="fp16"))
    check = result.manifest.to_dict()["verification"]
    assert check["precision"] == "fp16" and check["passed"]
    assert check["tolerance_abs_logit"] == pytest.approx(FP16_BOUND, rel=1e-4)
    assert 0 < check["onnx_vs_reference"]["max_abs_logit"] <= check["tolerance_abs_logit"]
    graph = onnx.load(str(result.path / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)
    config = model_config.parse_config((tmp_path / "repo" / "half" / "config.pbtxt").read_text())
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"


def _flipped(expected: np.ndarray, probe: int) -> np.ndarray:
    """`expected` with the top two classes of one probe swapped: a top-1 flip there only."""
    actual = expected.copy()
    first, second = np.argsort(expected[probe])[::-1][:2]
    actual[probe, [first, second]] = expected[probe, [second, first]]
    return actual


def test_top1_flip_on_a_clear_margin_fails_verification() -> None:
    """Top-1 must agree where the reference leads by more than 2x the bound, and only there:
    probe 0 leads by 1.1 x 2·bound (a flip is refused), probe 1 by 0.9 x 2·bound (tolerated)."""
    bound = FP16_BOUND
    expected = np.array([[2.2 * bound, 0.0, -1.0], [-1.0, 1.8 * bound, 0.0]])
    assert verify.top1_margin_ok(expected, expected, bound)
    assert not verify.top1_margin_ok(_flipped(expected, 0), expected, bound)
    assert verify.top1_margin_ok(_flipped(expected, 1), expected, bound)

    def failures(actual: np.ndarray) -> list[str]:
        return verify.Verification(
            precision="fp16", tolerance=bound, probes=2, onnx_vs_reference=verify.compare(actual, expected),
            merged_torch_vs_reference=None, onnx_vs_base=None, merged_vs_base=None,
            top1_consistent=verify.top1_margin_ok(actual, expected, bound),
        ).failures

    top1_message = "top-1 class differs from the reference's on a probe with a clear margin"
    assert failures(expected) == []
    assert any(top1_message in f for f in failures(_flipped(expected, 0)))
    assert not any(top1_message in f for f in failures(_flipped(expected, 1)))


@pytest.mark.slow
def test_config_pbtxt(tmp_path, tiny_config, classes_file) -> None:
    run_export(_options(tmp_path, tiny_config, classes_file, "none"))
    config = model_config.parse_config((tmp_path / "repo" / "tiny" / "config.pbtxt").read_text())
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    (image,), (logits,) = config.input, config.output
    assert (image.name, model_config_pb2.DataType.Name(image.data_type), list(image.dims)) == ("image", "TYPE_UINT8", [32, 32, 3])
    assert (logits.name, model_config_pb2.DataType.Name(logits.data_type), list(logits.dims)) == ("logits", "TYPE_FP32", [4])
    assert logits.label_filename == "labels.txt" and config.HasField("dynamic_batching")
    (group,) = config.instance_group  # one instance per GPU, or one on the CPU
    assert group.count == 1 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert not config.HasField("optimization")  # no TensorRT for an fp32 portable model


# --- failures leave the repository untouched -------------------------------------------------


def _assert_fails_cleanly(tmp_path, options, error, message) -> None:
    repo = options.repository
    before = tree_snapshot(repo)
    with pytest.raises(error, match=message):
        run_export(options)
    after = tree_snapshot(repo)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")
    }


@pytest.mark.slow
def test_noop_adapter_is_refused(tmp_path, tiny_config, classes_file) -> None:
    raw = factories.paper_checkpoint(encoder="vision", position="all")
    for layer in raw["weights"].values():
        for entry in layer.values():
            entry["w_lora_B"].zero_()  # the paper's initialisation: an untrained adapter
    path = tmp_path / "zero.pt"
    torch.save(raw, path)
    run_export(_options(tmp_path, tiny_config, classes_file, "none"))  # an existing model to protect
    _assert_fails_cleanly(tmp_path, _options(tmp_path, tiny_config, classes_file, str(path)), FailedPrecondition, "no-op adapter")


@pytest.mark.slow
def test_failed_verification_publishes_nothing(tmp_path, tiny_config, classes_file, paper_lora, monkeypatch) -> None:
    run_export(_options(tmp_path, tiny_config, classes_file, "none"))
    monkeypatch.setattr(verify, "FP32_TOLERANCE", 1e-12)
    _assert_fails_cleanly(tmp_path, _options(tmp_path, tiny_config, classes_file, paper_lora), FailedPrecondition,
                          "verification failed, nothing published")


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "x" * 65, ".hidden", "white space", "ünï"])
def test_invalid_model_names(tmp_path, tiny_config, classes_file, name) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        _options(tmp_path, tiny_config, classes_file, "none", name=name)
    assert not (tmp_path / "escape").exists()


def test_unwritable_repository(tmp_path, tiny_config, classes_file) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionDenied, match="not a folder|cannot write"):
        run_export(_options(tmp_path, tiny_config, classes_file, "none", repository=blocker / "repo"))
    assert blocker.read_text() == "not a folder"


def test_missing_weights_without_flag(tmp_path, tiny_config, classes_file) -> None:
    _assert_fails_cleanly(tmp_path, _options(tmp_path, tiny_config, classes_file, "none", allow_random_weights=False),
                          InvalidArgument, "--allow-random-weights")


@pytest.mark.slow
def test_other_classes_under_an_existing_name(tmp_path, tiny_config, classes_file) -> None:
    run_export(_options(tmp_path, tiny_config, classes_file, "none"))
    other = factories.write_classes(tmp_path / "other.txt", ["ant", "bee"])
    _assert_fails_cleanly(tmp_path, _options(tmp_path, tiny_config, other, "none"), FailedPrecondition, "different classes")


def test_bad_inputs(tmp_path, tiny_config, classes_file) -> None:
    bad_template = _options(tmp_path, tiny_config, classes_file, "none", templates=("no placeholder",))
    _assert_fails_cleanly(tmp_path, bad_template, InvalidArgument, r"must contain \{\}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _assert_fails_cleanly(tmp_path, _options(tmp_path, tiny_config, empty, "none"), InvalidArgument, "lists no classes")
    dupes = factories.write_classes(tmp_path / "dupes.txt", ["a", "b", "a"])
    _assert_fails_cleanly(tmp_path, _options(tmp_path, tiny_config, dupes, "none"), InvalidArgument, "repeats")


def test_classes_json_and_prompts(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(["golden_retriever", "cat"]))
    assert head.read_classes(path) == ["golden_retriever", "cat"]
    assert head.prompts("golden_retriever", ["a photo of a {}.", "{}!"]) == ["a photo of a golden retriever.", "golden retriever!"]


def test_template_average_is_renormalised_mean(tiny_base) -> None:
    templates = ["a photo of a {}.", "art of the {}."]
    matrix = head.class_text_matrix(tiny_base.model, tiny_base.tokenizer, ["red_panda"], templates)
    with torch.no_grad():
        each = F.normalize(tiny_base.model.encode_text(tiny_base.tokenizer(["a photo of a red panda.", "art of the red panda."])), dim=-1)
    torch.testing.assert_close(matrix[:, 0], F.normalize(each.mean(0), dim=0))
    assert not torch.allclose(matrix[:, 0], each[0], atol=1e-3)


@pytest.mark.subprocess
def test_concurrent_exports_take_successive_versions(tmp_path, tiny_config, classes_file) -> None:
    """Three `cliplora export` processes racing for one name: versions 1, 2, 3, all complete."""
    command = [sys.executable, "-m", "cliplora.cli", "export", "--model", str(tiny_config), "--lora", "none",
               "--classes", str(classes_file), "--name", "race", "--repository", str(tmp_path / "repo"),
               "--allow-random-weights", "--quiet", "--probes", "2"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    assert sorted(json.loads(out)["version"] for out, _ in outputs) == [1, 2, 3]
    folder = tmp_path / "repo" / "race"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["1", "2", "3"]
    for v in ("1", "2", "3"):
        assert json.loads((folder / v / "manifest.json").read_text())["version"] == int(v)
        onnx.checker.check_model(str(folder / v / "model.onnx"))


def test_errors_are_cliplora_errors_with_codes() -> None:
    assert FailedPrecondition.code == "FAILED_PRECONDITION" and issubclass(PermissionDenied, CliploraError)
