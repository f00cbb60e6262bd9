"""The base CLIP model: an open_clip architecture plus weights from a known source.

`--model` is an open_clip model name (``ViT-B-16``, ``ViT-B-16-quickgelu``, ...) or a
path to an open_clip JSON model config. `--pretrained` is an open_clip tag, a local
state-dict file (``.pt``/``.bin``/``.safetensors``, open_clip = OpenAI key layout) or an
OpenAI TorchScript archive. Without weights the export stops unless the caller allows
random weights explicitly; a random model is never produced silently.

QuickGELU: OpenAI's weights were trained with QuickGELU, most others with GELU. When the
weights say which (a tag's config, or an OpenAI archive) and the model config says the
other, the export stops and names the matching model; the activation in use is always
printed and recorded.
"""

from __future__ import annotations

import difflib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP

from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cliplora.core.hashing import sha256_file
from cliplora.core.manifest import BaseRecord, PreprocessRecord, WeightsRecord
from cliplora.model.checkpoint_io import (
    is_torchscript_archive,
    load_tensors,
    load_torchscript_state_dict,
)
from cliplora.model.merge import tower_blocks

RANDOM_SEED = 0
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class WeightsSource:
    """Where the base weights came from, for the manifest."""

    kind: str  # "tag" | "file" | "torchscript" | "random"
    reference: str  # the tag, the path, or "random"
    sha256: str | None
    quick_gelu: bool | None  # what the weights were trained with, when known

    def record(self) -> WeightsRecord:
        if self.kind == "random":
            return WeightsRecord(kind=self.kind, source=self.reference, sha256=self.sha256, seed=RANDOM_SEED,
                                 warning="random weights: this model classifies nothing; for tests and demos only")
        return WeightsRecord(kind=self.kind, source=self.reference, sha256=self.sha256)


@dataclass
class BaseModel:
    """An fp32, eval-mode open_clip CLIP with its tokenizer and preprocessing facts."""

    name: str
    model: CLIP
    tokenizer: Callable[[list[str]], torch.Tensor]
    weights: WeightsSource
    quick_gelu: bool
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    config: dict[str, Any]

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @property
    def embedding_dim(self) -> int:
        """The size of the joint image-text embedding space (D)."""
        return int(self.config["embed_dim"])

    @property
    def text_blocks(self) -> torch.nn.ModuleList:
        return tower_blocks(self.model, "text")

    @property
    def vision_blocks(self) -> torch.nn.ModuleList:
        return tower_blocks(self.model, "vision")

    def record(self) -> BaseRecord:
        """The base model's part of the manifest and of finetune's run record."""
        return BaseRecord(
            model=self.name,
            weights=self.weights.record(),
            activation="quick_gelu" if self.quick_gelu else "gelu",
            logit_scale=self.logit_scale,
            text_blocks=len(self.text_blocks),
            vision_blocks=len(self.vision_blocks),
            preprocess=PreprocessRecord(
                image_size=self.image_size,
                resize="shortest side, bicubic (PIL), then centre crop",
                mean=list(self.mean),
                std=list(self.std),
            ),
        )


def resolve_model_config(model: str) -> tuple[str, dict[str, Any]]:
    """(open_clip model name, its config) for a built-in name or a JSON config file."""
    path = Path(model)
    if model.endswith(".json"):
        if not path.is_file():
            raise NotFound(f"model config file not found: {path}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"model config {path} is not valid JSON: {exc}") from None
        config = config.get("model_cfg", config) if isinstance(config, dict) else config
        if not isinstance(config, dict) or not {"vision_cfg", "text_cfg", "embed_dim"} <= config.keys():
            raise InvalidArgument(
                f"model config {path} is not an open_clip model config "
                "(needs embed_dim, vision_cfg and text_cfg)"
            )
        open_clip.add_model_config(path)
        return path.stem, config
    name = model.replace("/", "-")  # accept OpenAI's spelling "ViT-B/16"
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise NotFound(f"unknown open_clip model {model!r}.{hint} Or pass a JSON model config file.")
    return name, config


def _normalise_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # an open_clip training checkpoint
    if not isinstance(obj, dict) or not obj:
        raise InvalidArgument(f"base weights {path} hold no state dict (a dict of tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    for key in _TORCHSCRIPT_EXTRA_KEYS:
        obj.pop(key, None)
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InvalidArgument(f"base weights {path}: entries are not tensors: {not_tensors[:5]}")
    return obj


def _load_state_dict(model: CLIP, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if unexpected and any(k.startswith(("vision_model.", "text_model.")) for k in unexpected):
        raise InvalidArgument(
            f"base weights {source} use the Hugging Face CLIP key layout; pass open_clip/OpenAI "
            "weights (a state dict with keys like 'visual.transformer.resblocks.0.attn.in_proj_weight')"
        )
    if missing or unexpected:
        raise InvalidArgument(
            f"base weights {source} do not fit the model: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}. "
            "Is --model the architecture these weights were trained for?"
        )
    wrong = [
        f"{k}: weights {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape) and not (k == "logit_scale" and state[k].numel() == 1)
    ]
    if wrong:
        raise InvalidArgument(f"base weights {source} have wrong shapes: {'; '.join(wrong[:5])}")
    state = {k: (v.reshape(expected[k].shape) if k == "logit_scale" else v) for k, v in state.items()}
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def _tag_checkpoint(name: str, tag: str) -> Path:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    try:
        return Path(open_clip.download_pretrained(cfg))
    except Exception as exc:  # hub and network errors come in many types
        raise Unavailable(
            f"could not fetch open_clip weights {name}/{tag} ({type(exc).__name__}: {exc}). "
            "Without network access, pass the weights file itself: --pretrained PATH"
        ) from None


def load_base_model(
    model: str,
    pretrained: str | None,
    *,
    allow_random_weights: bool = False,
) -> BaseModel:
    """Build the open_clip model `model` and load the weights `pretrained` into it."""
    name, config = resolve_model_config(model)
    weights, state = _read_weights(name, config, pretrained, allow_random_weights)
    if weights.quick_gelu is not None:
        _check_activation(name, config, weights.reference, weights.quick_gelu)
    clip = _build_model(name)
    if state is not None:
        _load_state_dict(clip, state, weights.reference)
    clip.eval()
    size, preprocess = _square_clip_preprocessing(name, clip)
    return BaseModel(
        name=name,
        model=clip,
        tokenizer=open_clip.get_tokenizer(name),
        weights=weights,
        quick_gelu=bool(config.get("quick_gelu", False)),
        image_size=size,
        mean=tuple(float(m) for m in preprocess["mean"]),
        std=tuple(float(s) for s in preprocess["std"]),
        config=config,
    )


def _read_weights(name: str, config: dict[str, Any], pretrained: str | None,
                  allow_random_weights: bool) -> tuple[WeightsSource, dict[str, torch.Tensor] | None]:
    """Where the weights come from and their state dict (None: random weights, only when allowed)."""
    if pretrained in (None, "", "none"):
        if not allow_random_weights:
            raise InvalidArgument(
                f"no weights for {name}: pass --pretrained (an open_clip tag such as "
                f"{_tags_hint(name)}, a state-dict file or an OpenAI .pt archive). "
                "For tests and demos only, --allow-random-weights exports a random model."
            )
        return WeightsSource("random", "random", None, None), None
    path = Path(pretrained)
    if path.exists():
        if is_torchscript_archive(path):
            state = load_torchscript_state_dict(path, "base weights")
            weights = WeightsSource("torchscript", str(path), sha256_file(path), True)
        else:
            state = load_tensors(path, "base weights")
            weights = WeightsSource("file", str(path), sha256_file(path), None)
        return weights, _normalise_state_dict(state, path)
    if open_clip.get_pretrained_cfg(name, pretrained):
        tag_quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        _check_activation(name, config, pretrained, tag_quick_gelu)  # before a long download
        checkpoint = _tag_checkpoint(name, pretrained)
        state = _normalise_state_dict(load_tensors(checkpoint, "base weights"), checkpoint)
        return WeightsSource("tag", pretrained, sha256_file(checkpoint), tag_quick_gelu), state
    raise NotFound(
        f"--pretrained {pretrained!r} is neither a file nor an open_clip tag for {name} "
        f"(tags: {_tags_hint(name)})"
    )


def _build_model(name: str) -> CLIP:
    """open_clip's model `name`, fp32 on the CPU, with random weights of a seed of its own.

    The caller's random state is left as it was (fork_rng restores it), and so is logging."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), _without_random_init_warning():
        torch.manual_seed(RANDOM_SEED)
        warnings.simplefilter("ignore")
        try:
            clip = open_clip.create_model(name, pretrained=None, precision="fp32", device="cpu")
        except Exception as exc:
            raise InvalidArgument(f"open_clip cannot build model {name}: {exc}") from None
    if not isinstance(clip, CLIP) or not hasattr(clip.visual, "transformer"):
        raise InvalidArgument(
            f"model {name} is not supported: cliplora needs a CLIP with transformer text and "
            "vision towers (ViT-*), as CLIP-LoRA adapts their attention"
        )
    return clip


def _square_clip_preprocessing(name: str, clip: CLIP) -> tuple[int, dict[str, Any]]:
    """The image size and preprocessing config, when they are CLIP's (square, shortest side, bicubic)."""
    preprocess = clip.visual.preprocess_cfg
    size = preprocess["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1]:
        raise InvalidArgument(f"model {name} takes non-square images {size}; only square inputs are supported")
    if preprocess.get("resize_mode", "shortest") != "shortest" or preprocess.get("interpolation", "bicubic") != "bicubic":
        raise InvalidArgument(
            f"model {name} preprocesses with {preprocess.get('resize_mode')}/{preprocess.get('interpolation')}; "
            "only shortest-side bicubic resize + centre crop (CLIP's) is supported"
        )
    return int(size[0]), preprocess


class _RandomInitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip logs "Model initialized randomly" on the root logger when built without
    weights; ours are loaded right after, so that one message is dropped, nothing else."""
    root = logging.getLogger()
    quiet = _RandomInitFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _check_activation(name: str, config: dict[str, Any], source: str, trained_quick_gelu: bool) -> None:
    """Stop when the weights' activation (QuickGELU or GELU) is not the model config's."""
    quick_gelu = bool(config.get("quick_gelu", False))
    if trained_quick_gelu == quick_gelu:
        return
    trained = "QuickGELU" if trained_quick_gelu else "GELU"
    suggestion = f"{name}-quickgelu" if trained_quick_gelu else name.removesuffix("-quickgelu")
    raise FailedPrecondition(
        f"activation mismatch: weights {source} were trained with {trained}, but model {name} "
        f"uses {'QuickGELU' if quick_gelu else 'GELU'}; every output would be subtly wrong. "
        f"Use --model {suggestion}."
    )


def _tags_hint(name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(name)
    return ", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "") if tags else "none known"
