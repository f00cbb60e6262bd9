"""The class head: class names and prompt templates -> the folded text matrix T [D, C].

As in CLIP and the CLIP-LoRA code: underscores in class names become spaces, each
prompt is encoded by the (adapted) text encoder and L2-normalised, the prompts of one
class are averaged over templates and the mean is normalised again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cliplora.core import open_vocab
from cliplora.core.errors import InvalidArgument
from cliplora.core.tokenizer import get_tokenizer

PLACEHOLDER = open_vocab.PLACEHOLDER
DEFAULT_TEMPLATE = open_vocab.DEFAULT_TEMPLATE
MAX_CLASSES = 100_000


def read_classes(path: str | Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON list of strings."""
    return validate_classes(open_vocab.read_names_file(path, "classes"), str(path))


def validate_classes(names: Sequence[str], source: str) -> list[str]:
    """Class names as given, or InvalidArgument: at least one, at most ``MAX_CLASSES``,
    each a non-empty single line, none twice, and no two the model reads alike
    (`cliplora.core.open_vocab.check_distinct` with the gateway's tokenizer: ``red_panda``
    and ``Red panda``, ``café`` and ``cafe\u0301``), the rule request-time labels follow."""
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
    try:
        open_vocab.check_distinct(names, get_tokenizer().encode, "class")
    except InvalidArgument as exc:
        raise InvalidArgument(f"classes file {source}: {exc}") from None
    return names


def validate_templates(templates: Sequence[str]) -> list[str]:
    """`--template`s (default ``a photo of a {}.``) by the rule the gateway applies to
    request-time templates (`cliplora.core.open_vocab`), without its request limits."""
    return open_vocab.model_templates(list(templates) or [DEFAULT_TEMPLATE])


def prompts(class_name: str, templates: Sequence[str]) -> list[str]:
    """One class's prompts."""
    return open_vocab.prompts([class_name], templates)


def prompt_tokens(
    tokenizer: Callable[[list[str]], torch.Tensor], classes: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Tokens of every prompt, class-major: [C * T, context] (`cliplora.core.open_vocab.prompts`)."""
    return tokenizer(open_vocab.prompts(classes, templates))


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
