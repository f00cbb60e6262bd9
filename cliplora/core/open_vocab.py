"""Open vocabulary: labels chosen at request time, scored like the export's class head.

The export folds a class head built this way; the gateway (``Classify`` with ``labels``)
and `cliplora predict --labels` build the same head at request time from the adapted
text encoder's embeddings, with the functions below:

- every label goes into every template, ``_`` becoming a space (`prompts`);
- the unit-norm prompt embeddings of one label are averaged over the templates and the
  mean is normalised again (`label_embeddings`);
- ``logit = logit_scale × cos(image_embeds, label)`` (`open_vocabulary_logits`).

With the model's own classes and templates this is the folded head. The rules for labels,
templates and ``Embed`` texts a caller may send, and their limits, are here too
(`validate_labels`, `validate_templates`, `validate_texts`): the export, the gateway and
the command line apply the same ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound

PLACEHOLDER = "{}"
DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class VocabularyLimits:
    """What one request may ask for (the gateway's ``--max-labels`` and friends)."""

    max_labels: int = 1000
    max_templates: int = 32
    max_label_chars: int = 300
    max_prompts: int = 32_000  # labels × templates: what one request may make the text encoder embed

    def __post_init__(self) -> None:
        if min(self.max_labels, self.max_templates, self.max_label_chars, self.max_prompts) < 1:
            raise InvalidArgument(f"vocabulary limits must be positive, got {self}")


def validate_labels(labels: Sequence[str], limits: VocabularyLimits = VocabularyLimits(), what: str = "label") -> list[str]:
    """Labels as given, or InvalidArgument: 1..max_labels of them, each non-empty after
    stripping, at most max_label_chars long, on one line, none given twice. (Two labels
    that differ but read alike to the model are refused by `check_distinct`, once a
    tokenizer is at hand.)"""
    labels = list(labels)
    if not labels:
        raise InvalidArgument(f"no {what}s given")
    if len(labels) > limits.max_labels:
        raise InvalidArgument(f"{len(labels)} {what}s; the limit is {limits.max_labels}")
    seen: dict[str, int] = {}
    for index, label in enumerate(labels):
        if not label.strip():
            raise InvalidArgument(f"{what} {index} is empty")
        if len(label) > limits.max_label_chars:
            raise InvalidArgument(f"{what} {index} has {len(label)} characters; the limit is {limits.max_label_chars}")
        if "\n" in label or "\r" in label:
            raise InvalidArgument(f"{what} {index} spans several lines")
        if label in seen:
            raise InvalidArgument(f"{what} {index} ({_shown(label)}) is given twice")
        seen[label] = index
    return labels


def check_distinct(labels: Sequence[str], encode: Callable[[str], Sequence[int]], what: str = "label") -> None:
    """InvalidArgument naming both when two labels are alike: the tokenizer (`encode`, the
    model's own: `cliplora.core.tokenizer.ClipTokenizer.encode`) gives their prompt text
    (`prompt_label`) the same ids, so they would be one row twice. This catches case, runs
    of spaces, ``_`` for a space, HTML entities and Unicode forms (``café`` and
    ``cafe\u0301``) alike, and nothing the model can tell apart. The export's class names
    and every request's labels go through this one rule."""
    seen: dict[tuple[int, ...], int] = {}
    for index, label in enumerate(labels):
        key = tuple(encode(prompt_label(label)))
        first = seen.setdefault(key, index)
        if first != index:
            if labels[first] == label:
                raise InvalidArgument(f"{what} {index} ({_shown(label)}) is given twice")
            raise InvalidArgument(f"{what} {index} ({_shown(label)}) is {what} {first} ({_shown(labels[first])}) "
                                  "again: the model reads the two alike (the tokenizer gives them the same ids)")


def validate_texts(texts: Sequence[str], limits: VocabularyLimits = VocabularyLimits()) -> list[str]:
    """``Embed``'s texts as given, or InvalidArgument: at most max_labels of them, each at
    most max_label_chars long (repeats and empty strings are allowed: each is embedded)."""
    texts = list(texts)
    if len(texts) > limits.max_labels:
        raise InvalidArgument(f"{len(texts)} texts; the limit is {limits.max_labels}")
    for index, text in enumerate(texts):
        if len(text) > limits.max_label_chars:
            raise InvalidArgument(f"text {index} has {len(text)} characters; the limit is {limits.max_label_chars}")
    return texts


def validate_templates(templates: Sequence[str], limits: VocabularyLimits = VocabularyLimits()) -> list[str]:
    """Templates as given (at least one), or InvalidArgument: each with exactly one ``{}``
    where the label goes, none twice, at most max_templates of them."""
    templates = list(templates)
    if not templates:
        raise InvalidArgument("no templates given")
    if len(templates) > limits.max_templates:
        raise InvalidArgument(f"{len(templates)} templates; the limit is {limits.max_templates}")
    for index, template in enumerate(templates):
        if template.count(PLACEHOLDER) != 1:
            raise InvalidArgument(
                f"template {index} ({_shown(template)}) must contain {PLACEHOLDER} exactly once, where the label goes")
        if len(template) > limits.max_label_chars:
            raise InvalidArgument(f"template {index} has {len(template)} characters; the limit is {limits.max_label_chars}")
    if len(set(templates)) != len(templates):
        raise InvalidArgument("a template is given twice")
    return templates


def not_open_vocabulary(model: str) -> FailedPrecondition:
    """The refusal of labels (or embeddings) for a model exported without a text encoder."""
    return FailedPrecondition(
        f"model {model!r} was exported without --open-vocabulary: it has no text encoder, so request-time "
        "labels and embeddings are not available; export it again with --open-vocabulary")


def check_vocabulary(model: str, expected_sha256: str, actual_sha256: str) -> None:
    """FailedPrecondition when this tokenizer's BPE vocabulary is not the one the model was
    exported with (its token ids would mean other words)."""
    if expected_sha256 and expected_sha256 != actual_sha256:
        raise FailedPrecondition(
            f"model {model!r} was exported with another BPE vocabulary (sha256 {expected_sha256[:12]}...) than "
            f"this tokenizer's ({actual_sha256[:12]}...); point CLIPLORA_BPE_VOCAB at the model's")


def model_templates(templates: Sequence[str]) -> list[str]:
    """The templates a model was exported with: trusted (the export checked them), so only
    the one-``{}`` rule applies, not a request's limits (CLIP's 80 ImageNet templates pass)."""
    templates = list(templates)
    longest = max((len(t) for t in templates), default=1)
    return validate_templates(templates, VocabularyLimits(max_templates=max(len(templates), 1),
                                                          max_label_chars=max(longest, 1)))


def check_prompt_budget(labels: Sequence[str], templates: Sequence[str], max_prompts: int) -> None:
    """InvalidArgument when labels × templates exceed what one request may ask to embed."""
    if len(labels) * len(templates) > max_prompts:
        raise InvalidArgument(f"{len(labels)} labels x {len(templates)} templates = {len(labels) * len(templates)} "
                              f"prompts; the limit is {max_prompts} per request")


def request_prompts(labels: Sequence[str], templates: Sequence[str] | None, exported_templates: Sequence[str],
                    max_prompts: int) -> list[str]:
    """The prompts to embed for validated `labels`: in the request's validated `templates`,
    else in the model's own (`model_templates`), within the prompt budget. The gateway and
    `cliplora predict --labels` both go through here."""
    chosen = list(templates) if templates else model_templates(exported_templates)
    check_prompt_budget(labels, chosen, max_prompts)
    return prompts(labels, chosen)


@dataclass(frozen=True)
class RequestVocabulary:
    """The labels a request ranks instead of the model's classes, and its own templates
    (empty: the model's), checked by the request limits (`parse`)."""

    labels: tuple[str, ...]
    templates: tuple[str, ...] = ()

    @classmethod
    def parse(cls, labels: Sequence[str], templates: Sequence[str],
              limits: VocabularyLimits = VocabularyLimits()) -> RequestVocabulary | None:
        """None when the request sends neither; InvalidArgument for templates without labels
        or anything `validate_labels` / `validate_templates` refuses."""
        if not labels and not templates:
            return None
        if not labels:
            raise InvalidArgument("templates go with labels: send the labels to rank with them")
        return cls(tuple(validate_labels(labels, limits)),
                   tuple(validate_templates(templates, limits)) if templates else ())

    def prompts(self, model_templates: Sequence[str], max_prompts: int) -> list[str]:
        """The prompts to embed (`request_prompts`): label-major, in this request's templates
        or else the model's own."""
        return request_prompts(self.labels, self.templates, model_templates, max_prompts)

    def logits(self, image_embeddings: np.ndarray, prompt_embeddings: np.ndarray, logit_scale: float) -> np.ndarray:
        """[N, L] logits from the [L * T, D] embeddings of `prompts` (`prompt_logits`)."""
        return prompt_logits(image_embeddings, prompt_embeddings, len(self.labels), logit_scale)


def prompt_logits(image_embeddings: np.ndarray, prompt_embeddings: np.ndarray, n_labels: int,
                  logit_scale: float) -> np.ndarray:
    """[N, D] unit image embeddings and the [L * T, D] unit embeddings of L labels' prompts
    (label-major) -> [N, L] logits: the head the export folds, built at request time. The
    one way from prompt embeddings to logits, for the gateway and `cliplora predict`."""
    return open_vocabulary_logits(image_embeddings, label_embeddings(prompt_embeddings, n_labels), logit_scale)


def read_names_file(path: str | Path, what: str = "labels") -> list[str]:
    """Names from a text file (one per line; blank lines skipped) or a JSON list of
    strings; each stripped. Used for ``--classes`` and ``--labels-file``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"{what} file not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as exc:
        raise InvalidArgument(f"cannot read {what} file {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{what} file {path} looks like JSON but is not valid: {exc}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidArgument(f"{what} file {path}: the JSON must be a list of strings")
        return [n.strip() for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def labels_argument(labels: str | None, labels_file: str | Path | None) -> list[str] | None:
    """``--labels a,b,c`` (comma-separated) or ``--labels-file F``; None when neither."""
    if labels is not None and labels_file is not None:
        raise InvalidArgument("give --labels or --labels-file, not both")
    if labels_file is not None:
        return read_names_file(labels_file)
    if labels is not None:
        return [label.strip() for label in labels.split(",")]
    return None


def prompt_label(label: str) -> str:
    """A label as it goes into a template: ``_`` becomes a space."""
    return label.replace("_", " ")


def prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every label in every template, label-major: [L * T] prompts."""
    return [template.replace(PLACEHOLDER, prompt_label(label)) for label in labels for template in templates]


def label_embeddings(prompt_embeddings: np.ndarray, n_labels: int) -> np.ndarray:
    """[L * T, D] unit-norm prompt embeddings (label-major) -> [L, D] unit-norm label embeddings."""
    per_prompt = np.asarray(prompt_embeddings, dtype=np.float32)
    if per_prompt.ndim != 2 or per_prompt.shape[0] % n_labels:
        raise ValueError(f"{per_prompt.shape} prompt embeddings for {n_labels} labels")
    mean = per_prompt.reshape(n_labels, per_prompt.shape[0] // n_labels, -1).mean(axis=1)
    return normalise(mean)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (as torch's F.normalize: a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def open_vocabulary_logits(image_embeddings: np.ndarray, labels: np.ndarray, logit_scale: float) -> np.ndarray:
    """[N, D] image and [L, D] label embeddings (unit norm) -> [N, L] logits."""
    return (np.float32(logit_scale) * np.asarray(image_embeddings, dtype=np.float32) @ labels.T).astype(np.float32)


def _shown(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else f"{text[:limit]}...")
