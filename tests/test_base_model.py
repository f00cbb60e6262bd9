"""Base weights: every source, and the errors that keep a wrong model from being exported."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound
from cliplora.model.base_model import load_base_model
from tests import factories


def _state(tiny_base) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_base.model.state_dict().items()}


def _state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_no_weights_without_the_flag_is_a_clear_error(tiny_config) -> None:
    with pytest.raises(InvalidArgument, match="no weights for tiny-clip: pass --pretrained.*--allow-random-weights"):
        load_base_model(str(tiny_config), None)


def test_random_weights_are_deterministic_and_recorded(tiny_config, tiny_base) -> None:
    again = load_base_model(str(tiny_config), None, allow_random_weights=True)
    assert _same_weights(again.model, tiny_base.model)
    record = tiny_base.record().model_dump()["weights"]
    assert record["kind"] == "random" and "random weights" in record["warning"]


@pytest.mark.parametrize("layout", ["pt", "bin", "safetensors", "open_clip_checkpoint", "ddp_prefixed"])
def test_state_dict_files(tmp_path, tiny_config, tiny_base, layout) -> None:
    state = _state(tiny_base)
    state = {k: v + 0.01 for k, v in state.items()}  # different from the random init
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / f"w.{'bin' if layout == 'bin' else 'pt'}"
        if layout == "open_clip_checkpoint":
            torch.save({"epoch": 3, "state_dict": state}, path)
        elif layout == "ddp_prefixed":
            torch.save({f"module.{k}": v for k, v in state.items()}, path)
        else:
            torch.save(state, path)
    base = load_base_model(str(tiny_config), str(path))
    assert not _same_weights(base.model, tiny_base.model)
    loaded = base.model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert base.weights.kind == "file" and len(base.weights.sha256) == 64


def test_torchscript_archive_like_openai_clip(tmp_path, tiny_config, tiny_base) -> None:
    """An OpenAI-style TorchScript archive loads its own weights; its QuickGELU is enforced.

    The archived model is perturbed away from the loader's seeded random init, so a loader
    that ignored the archive's state dict would hand back `tiny_base` and fail here.
    """

    class Holder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            for name, module in model.named_children():
                self.add_module(name, module)
            self.logit_scale = model.logit_scale
            self.positional_embedding = model.positional_embedding
            self.text_projection = model.text_projection
            self.register_buffer("input_resolution", torch.tensor(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.logit_scale

    source = load_base_model(str(tiny_config), None, allow_random_weights=True).model
    with torch.no_grad():
        for tensor in source.state_dict().values():
            tensor.add_(0.01)
    expected = _state_of(source)
    scripted = torch.jit.script(Holder(source))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted, str(path))
    base = load_base_model(str(tiny_config), str(path))
    assert base.weights.kind == "torchscript" and base.weights.quick_gelu is True
    loaded = base.model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not _same_weights(base.model, tiny_base.model)

    gelu_config = factories.write_config(tmp_path, "tiny-gelu", quick_gelu=False)
    with pytest.raises(FailedPrecondition, match="trained with QuickGELU, but model tiny-gelu uses GELU"):
        load_base_model(str(gelu_config), str(path))


def test_tag_activation_mismatch_is_caught_before_any_download() -> None:
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"] is True
    with pytest.raises(FailedPrecondition, match="Use --model ViT-B-16-quickgelu"):
        load_base_model("ViT-B-16", "openai")


def test_wrong_architecture_names_keys(tmp_path, tiny_config, tiny_base) -> None:
    state = _state(tiny_base)
    state.pop("visual.proj")
    state["visual.extra"] = torch.zeros(1)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(InvalidArgument, match=r"1 missing keys \['visual.proj'\], 1 unexpected keys \['visual.extra'\]"):
        load_base_model(str(tiny_config), str(path))


def test_wrong_shapes_name_the_tensor(tmp_path, tiny_config, tiny_base) -> None:
    state = _state(tiny_base)
    state["visual.proj"] = torch.zeros(96, 16)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(InvalidArgument, match=r"visual.proj: weights \(96, 16\) vs model \(96, 32\)"):
        load_base_model(str(tiny_config), str(path))


def test_hugging_face_layout_is_named(tmp_path, tiny_config) -> None:
    path = tmp_path / "hf.safetensors"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(InvalidArgument, match="Hugging Face CLIP key layout"):
        load_base_model(str(tiny_config), str(path))


def test_unknown_model_and_tag(tiny_config) -> None:
    with pytest.raises(NotFound, match="Did you mean: ViT-B-16"):
        load_base_model("ViT-B-17", None, allow_random_weights=True)
    with pytest.raises(NotFound, match="neither a file nor an open_clip tag"):
        load_base_model(str(tiny_config), "no-such-tag")


def test_malicious_base_weights_are_refused(tmp_path, tiny_config) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": Exploit()}, path)
    with pytest.raises(InvalidArgument, match="refusing to load base weights"):
        load_base_model(str(tiny_config), str(path))
    assert not marker.exists()


def test_base_model_manifest_records_preprocessing(tiny_base) -> None:
    record = tiny_base.record().model_dump()
    assert record["activation"] == "quick_gelu"
    assert record["preprocess"]["image_size"] == factories.IMAGE_SIZE
    assert record["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert record["model"] == "tiny-clip"


def test_loading_leaves_the_callers_random_state_and_logging(tiny_config) -> None:
    """Random weights are seeded inside the loader; the caller's RNG and logging are as they were."""
    import logging

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = load_base_model(str(tiny_config), None, allow_random_weights=True)
    assert torch.equal(torch.get_rng_state(), before)
    assert logging.root.manager.disable == logging.NOTSET and not logging.getLogger().filters
    torch.manual_seed(99)  # another caller state: the same random weights
    assert _same_weights(load_base_model(str(tiny_config), None, allow_random_weights=True).model, first.model)
