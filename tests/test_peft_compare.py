"""benchmarks/hf_clip.py, the open_clip -> Hugging Face CLIP copy the PEFT benchmark stands on.

The benchmark (benchmarks/peft_compare.py) compares a bank with PEFT on a Hugging Face
`CLIPModel` holding the bank's base weights; if the copy were wrong, the comparison would
time two different models. Needs `transformers` (the `bench` extra, not part of
`make install`): skipped, saying so, without it. PEFT itself is not needed here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests import factories

pytest.importorskip("transformers", reason="transformers is not installed: the bench extra, "
                    "`.venv/bin/pip install -e '.[bench]'`, is for benchmarks/peft_compare.py only")

HF_CLIP = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_clip.py"


def _hf_clip():
    spec = importlib.util.spec_from_file_location("hf_clip", HF_CLIP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unit(output: object) -> torch.Tensor:
    return F.normalize(getattr(output, "pooler_output", output), dim=-1)


def test_hugging_face_copy_gives_open_clips_embeddings(tiny_base) -> None:
    hf = _hf_clip().to_hf_clip(tiny_base.model)
    pixels = torch.randn(3, 3, tiny_base.image_size, tiny_base.image_size, generator=torch.Generator().manual_seed(0))
    tokens = tiny_base.tokenizer(["a photo of a cat", "a dog", "red panda on a branch"])
    with torch.inference_mode():
        images, hf_images = _unit(tiny_base.model.encode_image(pixels)), _unit(hf.get_image_features(pixel_values=pixels))
        texts, hf_texts = _unit(tiny_base.model.encode_text(tokens)), _unit(hf.get_text_features(input_ids=tokens))
        fresh = _unit(type(hf)(hf.config).eval().get_image_features(pixel_values=pixels))
    assert (images - hf_images).abs().max() < 1e-5
    assert (texts - hf_texts).abs().max() < 1e-5
    # Not trivially equal: the inputs give different embeddings, and Hugging Face's own
    # initialisation of the same config does not give open_clip's.
    assert (images[0] - images[1]).abs().max() > 1e-2 and (texts[0] - texts[1]).abs().max() > 1e-2
    assert (fresh - images).abs().max() > 1e-2


def test_q_k_v_are_open_clips_in_proj_rows(tiny_base) -> None:
    state = _hf_clip().hf_state_dict(tiny_base.model)
    block = 5
    for target in "qkv":
        expected = factories.projection(tiny_base.model, "vision", block, target)  # sliced by hand
        assert torch.equal(state[f"vision_model.encoder.layers.{block}.self_attn.{target}_proj.weight"], expected)
    assert torch.equal(state["visual_projection.weight"], tiny_base.model.visual.proj.detach().t())


def test_an_architecture_the_mapping_does_not_describe_is_refused(tmp_path) -> None:
    from cliplora.model.base_model import load_base_model

    config = factories.TINY_CONFIG["vision_cfg"] | {"ls_init_value": 0.1}  # layer scale: no Hugging Face CLIP has it
    base = load_base_model(str(factories.write_config(tmp_path, vision_cfg=config)), None, allow_random_weights=True)
    with pytest.raises(ValueError, match=r"no Hugging Face name for 'visual\.transformer\.resblocks\.0\.ls_1\.gamma'"):
        _hf_clip().to_hf_clip(base.model)
