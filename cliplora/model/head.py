"""The class head: class names and prompt templates -> the folded text matrix T [D, C].

As in CLIP and the CLIP-LoRA code: underscores in class names become spaces, each
prompt is encoded by the (adapted) text encoder and L2-normalised, the prompts of one
class are averaged over templates and the mean is normalised again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cliplora.core.errors import InvalidArgument, NotFound

PLACEHOLDER = "{}"
DEFAULT_TEMPLATE = "a photo of a {}."
MAX_CLASSES = 100_000


def read_classes(path: str | Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON list of strings."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"classes file not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise InvalidArgument(f"cannot read classes file {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"classes file {path} looks like JSON but is not valid: {exc}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidArgument(f"classes file {path}: the JSON must be a list of strings")
        names = [n.strip() for n in names]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    return validate_classes(names, str(path))


def validate_classes(names: Sequence[str], source: str) -> list[str]:
    names = list(names)
    if not names:
        raise InvalidArgument(f"classes file {source} lists no classes")
    if len(names) > MAX_CLASSES:
        raise InvalidArgument(f"classes file {source} lists {len(names)} classes; the limit is {MAX_CLASSES}")
    bad = [n for n in names if not n or any(c in n for c in "\n\r")]
    if bad:
        raise InvalidArgument(f"classes file {source}: class names must be non-empty single lines: {bad[:3]!r}")
    seen: set[str] = set()
    duplicates = [n for n in names if n in seen or seen.add(n)]
    if duplicates:
        raise InvalidArgument(f"classes file {source} repeats class names: {sorted(set(duplicates))[:5]}")
    return names


def validate_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates) or [DEFAULT_TEMPLATE]
    for template in templates:
        if template.count(PLACEHOLDER) != 1:
            raise InvalidArgument(f"template {template!r} must contain {PLACEHOLDER} exactly once, where the class name goes")
    if len(set(templates)) != len(templates):
        raise InvalidArgument("a --template is given twice")
    return templates


def prompts(class_name: str, templates: Sequence[str]) -> list[str]:
    name = class_name.replace("_", " ")
    return [t.replace(PLACEHOLDER, name) for t in templates]


def prompt_tokens(
    tokenizer: Callable[[list[str]], torch.Tensor], classes: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Tokens of every prompt, class-major: [C * T, context]."""
    return tokenizer([p for c in classes for p in prompts(c, templates)])


def class_embeddings(model: nn.Module, tokens: torch.Tensor, n_classes: int, *, batch_size: int = 256) -> torch.Tensor:
    """Unit-norm class embeddings [C, D] from class-major prompt tokens.

    Differentiable: `cliplora finetune` trains through it with the adapted text
    encoder, and the export folds the very same computation into the graph.
    """
    features = [
        F.normalize(model.encode_text(tokens[start : start + batch_size]).float(), dim=-1)
        for start in range(0, len(tokens), batch_size)
    ]
    per_prompt = torch.cat(features).reshape(n_classes, len(tokens) // n_classes, -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


@torch.no_grad()
def class_text_matrix(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classes: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
) -> torch.Tensor:
    """T [D, C]: unit-norm class embeddings from `model`'s text encoder, as columns."""
    return text_matrix(model, prompt_tokens(tokenizer, classes, templates), len(classes), batch_size=batch_size)


@torch.no_grad()
def text_matrix(model: nn.Module, tokens: torch.Tensor, n_classes: int, *, batch_size: int = 256) -> torch.Tensor:
    """T [D, C] from prompt tokens already made (one tokenisation for several models)."""
    return class_embeddings(model, tokens, n_classes, batch_size=batch_size).t().contiguous()
