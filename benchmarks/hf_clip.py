"""An open_clip CLIP as a Hugging Face `CLIPModel` with the same weights (for the PEFT benchmark).

PEFT's CLIP adapters target Hugging Face's module names, so the comparison with a bank
(benchmarks/peft_compare.py) needs the bank's base model in Hugging Face's layout. The
config is read off the built open_clip model (widths, blocks, heads, activation), and every
weight is renamed one to one: open_clip's ``in_proj_weight`` rows [0:d], [d:2d], [2d:3d]
are Hugging Face's q, k and v projections, and a projection matrix applied as ``x @ P`` is
the weight ``Pᵀ`` of Hugging Face's bias-free ``Linear``. A weight left over on either side
is an error, so an architecture this mapping does not describe (layer scale, attention
pooling, a pooled ``ln_post``) stops here instead of giving different embeddings.

Needs ``transformers`` (the ``bench`` extra: ``.venv/bin/pip install -e '.[bench]'``).
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU
from transformers import CLIPConfig, CLIPModel

_BLOCK = {  # open_clip resblock key -> Hugging Face encoder layer key
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_PLAIN = {  # the rest, renamed as they are
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.", "transformer.resblocks.": "text_model.encoder.layers."}


def hf_config(clip: CLIP) -> CLIPConfig:
    """The `CLIPConfig` of the same architecture, read off the built open_clip model."""
    visual, text_block = clip.visual, clip.transformer.resblocks[0]
    _check_pooling(clip)
    width, _, patch, _ = visual.conv1.weight.shape
    grid = round((visual.positional_embedding.shape[0] - 1) ** 0.5)
    vision_block = visual.transformer.resblocks[0]
    return CLIPConfig(
        projection_dim=visual.proj.shape[1],
        logit_scale_init_value=float(clip.logit_scale.detach()),
        vision_config={
            "hidden_size": width, "image_size": grid * patch, "patch_size": patch,
            "num_hidden_layers": len(visual.transformer.resblocks), "num_attention_heads": vision_block.attn.num_heads,
            "intermediate_size": vision_block.mlp.c_fc.out_features, "hidden_act": _activation(vision_block),
            "projection_dim": visual.proj.shape[1],
        },
        text_config={
            "hidden_size": clip.token_embedding.weight.shape[1], "vocab_size": clip.token_embedding.weight.shape[0],
            "max_position_embeddings": clip.positional_embedding.shape[0],
            "num_hidden_layers": len(clip.transformer.resblocks), "num_attention_heads": text_block.attn.num_heads,
            "intermediate_size": text_block.mlp.c_fc.out_features, "hidden_act": _activation(text_block),
            "projection_dim": clip.text_projection.shape[1],
            # open_clip pools the text at the highest token id (its end token): Hugging Face's rule for id 2.
            "eos_token_id": 2,
        },
    )


def hf_state_dict(clip: CLIP) -> dict[str, torch.Tensor]:
    """Every open_clip weight under its Hugging Face name (copies; q/k/v split from ``in_proj``)."""
    state: dict[str, torch.Tensor] = {}
    for key, value in clip.state_dict().items():
        value = value.detach().clone()
        if key == "attn_mask":  # open_clip's causal mask buffer: Hugging Face builds its own
            continue
        if key in _PLAIN:
            state[_PLAIN[key]] = value
        elif key in _TRANSPOSED:
            state[_TRANSPOSED[key]] = value.t().contiguous()
        else:
            state.update(_block_weights(key, value))
    return state


def to_hf_clip(clip: CLIP) -> CLIPModel:
    """A Hugging Face `CLIPModel` in eval mode holding `clip`'s weights; every weight accounted for."""
    model = CLIPModel(hf_config(clip)).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(clip), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers Hugging Face computes
    if missing or unexpected:
        raise ValueError(f"open_clip -> Hugging Face CLIP: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _block_weights(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    tower = next((t for t in _TOWERS if key.startswith(t)), None)
    if tower is None:
        raise ValueError(f"open_clip -> Hugging Face CLIP: no Hugging Face name for {key!r}")
    block, _, rest = key[len(tower):].partition(".")
    prefix = f"{_TOWERS[tower]}{block}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{p}_proj.{kind}": t.contiguous() for p, t in zip("qkv", (q, k, v), strict=True)}
    if rest not in _BLOCK:
        raise ValueError(f"open_clip -> Hugging Face CLIP: no Hugging Face name for {key!r}")
    return {prefix + _BLOCK[rest]: value}


def _activation(block: torch.nn.Module) -> str:
    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ValueError(f"open_clip -> Hugging Face CLIP: no Hugging Face activation for {act!r}")


def _check_pooling(clip: CLIP) -> None:
    """Hugging Face pools the class token after ``post_layernorm``, and the text at its end token."""
    visual = clip.visual
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("open_clip -> Hugging Face CLIP: only class-token pooling of the image tower maps")
    if getattr(clip, "text_pool_type", "argmax") != "argmax":
        raise ValueError("open_clip -> Hugging Face CLIP: only end-token (argmax) pooling of the text tower maps")
