"""Reading adapters: the paper's checkpoints, PEFT folders, and every way they go wrong."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from cliplora.core.errors import InvalidArgument, NotFound
from cliplora.model.adapters import load_adapter
from cliplora.model.merge import merge_adapter
from tests import factories


def _save(tmp_path: Path, obj: object, name: str = "lora.pt") -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def test_paper_checkpoint_saved_on_cuda_style_dtypes_loads(tmp_path) -> None:
    raw = factories.paper_checkpoint(encoder="vision", position="top", params=("q",))
    raw["weights"]["layer_0"]["q_proj"] = {k: v.half() for k, v in raw["weights"]["layer_0"]["q_proj"].items()}
    adapter = load_adapter(_save(tmp_path, raw), 12, 12)
    (update,) = adapter.updates
    assert (update.tower, update.block, update.target, update.a.dtype) == ("vision", 11, "q", torch.float32)
    assert update.scale == pytest.approx(1 / math.sqrt(2))
    assert adapter.record().targets == {"vision": {"q": [11]}}


def test_params_as_string_like_the_papers_argparse(tmp_path) -> None:
    raw = factories.paper_checkpoint(encoder="text", position="top2", params=("q", "v"))
    raw["metadata"]["params"] = "qv"
    adapter = load_adapter(_save(tmp_path, raw), 12, 12)
    assert adapter.targets == {"text": {"q": [10, 11], "v": [10, 11]}}


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda raw: raw["metadata"].update(position="half-up"), r"6 adapted blocks.*12 entries"),
        (lambda raw: raw["metadata"].update(encoder="both"), r"24 adapted blocks.*12 entries"),
        (lambda raw: raw["metadata"].update(params=["q", "k", "v", "o"]), r"layer_0 .*has \['k_proj', 'q_proj', 'v_proj'\]"),
        (lambda raw: raw["metadata"].update(r=4), r"rank 2/2 .* metadata r=4"),
        (lambda raw: raw["metadata"].update(encoder="audio"), "encoder must be text, vision or both"),
        (lambda raw: raw["metadata"].update(position="middle"), "unknown LoRA position 'middle'"),
        (lambda raw: raw["metadata"].update(params=["q", "x"]), "subset of q, k, v, o"),
        (lambda raw: raw["metadata"].pop("alpha"), r"metadata lacks \['alpha'\]"),
        (lambda raw: raw.pop("metadata"), "not a CLIP-LoRA checkpoint"),
        (lambda raw: raw["weights"]["layer_3"]["q_proj"].pop("w_lora_B"), "layer_3.q_proj .*w_lora_A and w_lora_B"),
        (lambda raw: raw["weights"]["layer_3"]["q_proj"].update(w_lora_A=torch.zeros(2, 64, 1)), "2-D floating tensor"),
    ],
)
def test_metadata_inconsistent_with_tensors(tmp_path, mutate, message) -> None:
    raw = factories.paper_checkpoint(encoder="vision", position="all")
    mutate(raw)
    with pytest.raises(InvalidArgument, match=message):
        load_adapter(_save(tmp_path, raw), 12, 12)


def test_truncated_checkpoint(tmp_path) -> None:
    path = Path(_save(tmp_path, factories.paper_checkpoint()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArgument, match="truncated, corrupt or not a PyTorch file"):
        load_adapter(str(path), 12, 12)


class _Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, legacy) -> None:
    marker = tmp_path / "pwned"
    raw = factories.paper_checkpoint(encoder="text", position="top1", params=("q",))
    raw["metadata"]["note"] = _Exploit(str(marker))
    path = tmp_path / "evil.pt"
    if legacy:
        with open(path, "wb") as handle:
            pickle.dump(raw, handle)
    else:
        torch.save(raw, path)
    with pytest.raises(InvalidArgument, match="refusing to load LoRA checkpoint .*could run arbitrary code|corrupt pickle"):
        load_adapter(str(path), 12, 12)
    assert not marker.exists()
    # Sanity: plain unpickling really would have run it.
    if legacy:
        with open(path, "rb") as handle:
            pickle.load(handle)
        assert marker.exists()


def test_missing_file_and_none(tmp_path) -> None:
    assert load_adapter("none", 12, 12) is None
    with pytest.raises(NotFound, match="LoRA adapter not found"):
        load_adapter(str(tmp_path / "missing.pt"), 12, 12)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_maps_hf_projections_onto_open_clip_slices(tmp_path, tiny_base, use_rslora) -> None:
    modules = [("vision", 0, "q"), ("vision", 5, "v"), ("text", 3, "k"), ("text", 11, "o")]
    folder = factories.write_peft_adapter(tmp_path / "peft", modules=modules, r=4, alpha=8.0, use_rslora=use_rslora)
    adapter = load_adapter(str(folder), 12, 12)
    assert adapter.format == "peft"
    scale = factories.expected_scale(8.0, 4, "sqrt" if use_rslora else "linear")
    assert [u.scale for u in adapter.updates] == pytest.approx([scale] * len(modules))

    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    merged, _ = merge_adapter(tiny_base.model, adapter)
    for tower, block, target in modules:
        hf = f"base_model.model.{'text_model' if tower == 'text' else 'vision_model'}.encoder.layers.{block}.self_attn.{factories.HF_PROJ[target]}"
        delta = tensors[f"{hf}.lora_B.weight"] @ tensors[f"{hf}.lora_A.weight"] * scale
        got = factories.projection(merged, tower, block, target)
        base_w = factories.projection(tiny_base.model, tower, block, target)
        torch.testing.assert_close(got, base_w + delta, rtol=0, atol=1e-6)


def test_peft_rank_and_alpha_patterns(tmp_path) -> None:
    folder = factories.write_peft_adapter(
        tmp_path / "peft",
        modules=[("vision", 0, "q"), ("vision", 1, "q")],
        r=4,
        alpha=8.0,
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 1.0},
    )
    adapter = load_adapter(str(folder), 12, 12)
    scales = {u.block: u.scale for u in adapter.updates}
    assert scales == {0: pytest.approx(2.0), 1: pytest.approx(0.5)}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "train biases"),
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "not LORA"),
        ({"r": 0}, "r must be a positive number"),
        ({"r": 8}, "rank 4/4 .* r=8"),
    ],
)
def test_peft_unsupported_variants_are_refused(tmp_path, overrides, message) -> None:
    folder = factories.write_peft_adapter(tmp_path / "peft", config_overrides=overrides)
    with pytest.raises(InvalidArgument, match=message):
        load_adapter(str(folder), 12, 12)


def test_peft_unsupported_module(tmp_path) -> None:
    from safetensors.torch import save_file

    folder = factories.write_peft_adapter(tmp_path / "peft")
    save_file(
        {"base_model.model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 96)},
        str(folder / "adapter_model.safetensors"),
    )
    with pytest.raises(InvalidArgument, match="mlp.fc1.*only LoRA on the self-attention"):
        load_adapter(str(folder), 12, 12)


def test_peft_folder_without_config(tmp_path) -> None:
    folder = factories.write_peft_adapter(tmp_path / "peft")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(NotFound, match="adapter_config.json is missing"):
        load_adapter(str(folder), 12, 12)


def test_peft_truncated_safetensors(tmp_path) -> None:
    folder = factories.write_peft_adapter(tmp_path / "peft")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InvalidArgument, match="not a valid safetensors file"):
        load_adapter(str(folder), 12, 12)
    json.loads((folder / "adapter_config.json").read_text())  # untouched


def _as_bin_folder(safetensors_folder: Path, folder: Path) -> Path:
    """The same PEFT adapter as older PEFT versions save it: the same tensors, torch.save'd to
    ``adapter_model.bin``, and no safetensors file beside it."""
    from safetensors.torch import load_file

    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((safetensors_folder / "adapter_config.json").read_bytes())
    torch.save(load_file(str(safetensors_folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    return folder


def test_peft_adapter_model_bin_loads_and_exports_like_safetensors(tmp_path, tiny_config, classes_file) -> None:
    """A ``.bin`` PEFT folder gives exactly the updates of its safetensors twin (tensor for
    tensor, scales from the patterns included), and it exports, verified."""
    from cliplora.export.pipeline import ExportOptions, run_export

    safetensors = factories.write_peft_adapter(tmp_path / "st", rank_pattern={"layers.5.self_attn.v_proj": 2},
                                               alpha_pattern={"layers.3.self_attn.k_proj": 2.0})
    binary = _as_bin_folder(safetensors, tmp_path / "bin")
    assert sorted(p.name for p in binary.iterdir()) == ["adapter_config.json", "adapter_model.bin"]
    expected = load_adapter(str(safetensors), 12, 12)
    assert len({u.scale for u in expected.updates}) == 3
    for spec in (binary, binary / "adapter_model.bin"):
        adapter = load_adapter(str(spec), 12, 12)
        assert adapter.format == "peft" and len(adapter.updates) == len(expected.updates) == 4
        for got, want in zip(adapter.updates, expected.updates, strict=True):
            assert (got.tower, got.block, got.target, got.scale) == (want.tower, want.block, want.target, want.scale)
            assert torch.equal(got.a, want.a) and torch.equal(got.b, want.b)

    result = run_export(ExportOptions(model=str(tiny_config), pretrained=None, lora=str(binary), classes=classes_file,
                                      templates=("a photo of a {}.",), name="peft-bin", repository=tmp_path / "repo",
                                      allow_random_weights=True, probes=2))
    manifest = result.manifest.to_dict()
    assert manifest["lora"]["format"] == "peft" and manifest["verification"]["passed"]
    assert manifest["verification"]["onnx_vs_base"]["max_abs_logit"] > 1e-2
