"""What the gateway knows of the models Triton serves, and the route of one request.

`ModelEntry` (a classifier or an adapter bank), `TextEntry` (a classifier's text encoder),
`OpenVocabulary` (what the classifier's config says about its text side) and `BankSide`
(a bank's adapter tables) are built by discovery (`cliplora.serve.gateway.triton`) from
Triton's repository index, model configs and, for banks, their companion's adapter table.
`Route` is what one lookup gives a request: the entry, the version the answer comes from,
the text side when the request needs it, and a bank's adapter, all checked once.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cliplora.core import contract, open_vocab
from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from cliplora.serve.gateway.errors import NotLoadedTogether

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEntry:
    """A classifier's text encoder (``<name>_text``) as Triton describes it."""

    name: str
    versions: tuple[int, ...]  # ready versions, ascending
    embedding_dim: int
    max_batch_size: int
    classifier: str  # the model it belongs to, from its config
    per_adapter: bool = False  # a bank's: each sample names its adapter (``adapter`` input)


@dataclass(frozen=True)
class OpenVocabulary:
    """What a classifier exported with ``--open-vocabulary`` says about its text side."""

    text: TextEntry
    logit_scale: float
    templates: tuple[str, ...]
    vocab_sha256: str  # the BPE vocabulary the text encoder's token ids come from

    @property
    def embedding_dim(self) -> int:
        return self.text.embedding_dim  # the image side's, too: a mismatch is no open vocabulary


@dataclass(frozen=True)
class BankSide:
    """What discovery knows of an adapter bank: its companion (``NAME_adapters``), the scale
    of its logits, and each ready version's adapter table (id -> row, base first)."""

    adapters_model: str
    logit_scale: float
    embedding_dim: int
    tables: dict[int, dict[str, contract.AdapterRow]]  # versions both the bank and its companion have ready
    # adapter id -> its promoted classifier (`cliplora bank promote`), ready and matching the newest table
    promotions: dict[str, ModelEntry] = field(default_factory=dict)
    text: TextEntry | None = None  # `--open-vocabulary`: each adapter's text encoder, when ready
    text_model: str | None = None  # the text encoder the config names, ready or not
    vocab_sha256: str = ""  # the BPE vocabulary its token ids come from

    def text_side(self, bank: str, row: contract.AdapterRow) -> OpenVocabulary:
        """The open-vocabulary side of one adapter: the bank's text encoder, the adapter's
        templates; FAILED_PRECONDITION for a bank without, UNAVAILABLE while not ready."""
        if self.text is not None:
            return OpenVocabulary(self.text, self.logit_scale, row.templates, self.vocab_sha256)
        if self.text_model:
            raise Unavailable(f"the text encoder {self.text_model!r} of bank {bank!r} is not ready in Triton")
        raise FailedPrecondition(f"bank {bank!r} has no text encoder: request-time labels and text "
                                 "embeddings need a bank created with --open-vocabulary")

    def latest_table(self) -> dict[str, contract.AdapterRow]:
        return self.tables[max(self.tables)] if self.tables else {}

    def adapter(self, bank: str, version: int, adapter: str) -> contract.AdapterRow:
        """The row of `adapter` (empty: the base) in `version`'s table; NotFound naming it."""
        table = self.tables[version]
        row = table.get(adapter or contract.BASE_ADAPTER)
        if row is None:
            shown = ", ".join(list(table)[:10]) + (", ..." if len(table) > 10 else "")
            raise NotFound(f"adapter {adapter!r} not found in bank {bank!r} version {version} (adapters: {shown})")
        return row


@dataclass(frozen=True)
class AdapterHead:
    """One bank adapter's classes: unit class embeddings [C, D] and their names."""

    embeddings: np.ndarray
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class ModelEntry:
    """A servable model as Triton describes it: a classifier, or an adapter bank (`bank`)."""

    name: str
    versions: tuple[int, ...]  # ready versions, ascending
    image_size: int
    num_classes: int  # a bank: its base's (each adapter has its own, in `bank.tables`)
    max_batch_size: int
    class_names: tuple[str, ...]  # a classifier's labels.txt, by Triton's classification extension; () for a bank
    open_vocabulary: OpenVocabulary | None = None  # None: no (ready) text encoder
    text_model: str | None = None  # the text encoder the config names, ready or not
    bank: BankSide | None = None  # set for an adapter bank
    promotion: contract.Promotion | None = None  # set for a bank adapter's promoted classifier (NAME--ID)

    @property
    def kind(self) -> str:
        return contract.KIND_BANK if self.bank is not None else contract.KIND_CLASSIFIER

    def resolve(self, version: int) -> int:
        """The version to run: `version`, or the latest ready one for 0."""
        if version == 0:
            return self.versions[-1]
        if version not in self.versions:
            raise NotFound(f"model {self.name!r} has no ready version {version} (ready: {list(self.versions)})")
        return version

    def text_side(self) -> OpenVocabulary:
        """The open-vocabulary side. FAILED_PRECONDITION naming the flag for a model exported
        without it; UNAVAILABLE for one whose text encoder is not ready (yet)."""
        if self.open_vocabulary is not None:
            return self.open_vocabulary
        if self.text_model:
            raise Unavailable(f"the text encoder {self.text_model!r} of model {self.name!r} is not ready in Triton")
        raise open_vocab.not_open_vocabulary(self.name)

    def text_missing(self, version: int) -> bool:
        """True when the text encoder, or its `version` (0: any), was not ready at the last look."""
        if self.bank is not None:
            text = self.bank.text
            return self.bank.text_model is not None and (text is None or bool(version) and version not in text.versions)
        if self.open_vocabulary is None:
            return self.text_model is not None
        return bool(version) and version not in self.open_vocabulary.text.versions

    def route(self, version: int, *, text: bool = False, embeds: bool = False, adapter: str = "") -> Route:
        """The route of a request for `version` (0: latest) that needs the text side (`text`:
        request-time labels, text embeddings) or image embeddings (`embeds`).

        A classifier has image embeddings only with its text side (``--open-vocabulary``):
        with either need the text side must be there, and the version is pinned to the
        newest one the classifier and its text encoder both have ready (they are one export).
        A bank's route is pinned to a version whose adapter table the gateway holds, with the
        `adapter`'s row (empty: the base); `adapter` on a classifier is INVALID_ARGUMENT."""
        if self.bank is not None:
            return self._bank_route(version, text=text, embeds=embeds, adapter=adapter)
        if adapter:
            raise InvalidArgument(f"model {self.name!r} is not an adapter bank: 'adapter' is for banks "
                                  f"(ListModels shows each model's kind)")
        if not text and not embeds:
            return Route(self, requested=version, version=self.resolve(version))
        vocabulary = self.text_side()
        if version:
            return Route(self, requested=version, version=self.resolve(version), vocabulary=vocabulary)
        common = sorted(set(self.versions) & set(vocabulary.text.versions))
        if not common:
            raise NotLoadedTogether(f"model {self.name!r} and its text encoder {vocabulary.text.name!r} have no "
                              f"ready version in common yet ({list(self.versions)} vs "
                              f"{list(vocabulary.text.versions)})")
        return Route(self, requested=version, version=common[-1], vocabulary=vocabulary)

    def _bank_route(self, version: int, *, text: bool, embeds: bool, adapter: str) -> Route:
        """A bank adapter's route: to its promoted classifier when there is one for the
        newest table (and the request asks for that version or the latest, and for image
        embeddings only if the promoted classifier has them), else to the bank itself,
        pinned to the version whose table gives the adapter's slot."""
        bank = self.bank
        assert bank is not None
        tabled = sorted(set(self.versions) & set(bank.tables))
        if text and bank.text is not None:  # the text side too: a version all three have ready
            tabled = sorted(set(tabled) & set(bank.text.versions))
        if version:
            self.resolve(version)
            if version not in self.bank.tables:
                raise NotLoadedTogether(f"the adapter table of bank {self.name!r} version {version} is not ready yet")
        elif not tabled:
            also = " and text encoder" if text else ""
            raise NotLoadedTogether(f"no version of bank {self.name!r} has its adapter table{also} ready yet")
        chosen = version or tabled[-1]
        row = bank.adapter(self.name, chosen, adapter)
        vocabulary = bank.text_side(self.name, row) if text else None
        promoted = bank.promotions.get(row.adapter)
        if promoted is not None and promoted.promotion is not None and chosen == max(bank.tables) \
                and ((not embeds and not text) or promoted.open_vocabulary is not None):
            return replace(promoted.route(0, text=text, embeds=embeds), bank_version=chosen,
                           promotion=promoted.promotion)
        return Route(self, requested=version, version=chosen, adapter=row, vocabulary=vocabulary)


@dataclass(frozen=True)
class Route:
    """Everything one request needs of its model, from one lookup.

    `version` is the version the answer comes from as far as the gateway knows. A call
    without a text side asks Triton for `requested` (0: the latest of whichever replica
    takes the call, which during a rolling upgrade may be newer than what the gateway last
    saw), and the answer says which version ran. A call with a text side (`vocabulary`)
    is pinned: image and text encoders run `version`, the one both have. So is a bank's
    call: the `adapter`'s slot is read from `version`'s table.
    """

    entry: ModelEntry
    requested: int
    version: int
    vocabulary: OpenVocabulary | None = None
    adapter: contract.AdapterRow | None = None  # a bank's adapter (its base when none was asked for)
    promotion: contract.Promotion | None = None  # set when a promoted classifier answers for a bank's adapter
    bank_version: int = 0  # with `promotion`: the bank version whose table routed the call there

    @property
    def model_name(self) -> str:
        """The model the caller named: the bank, when its adapter's promoted classifier answers."""
        return self.promotion.bank if self.promotion is not None else self.entry.name

    @property
    def adapter_id(self) -> str:
        """The bank adapter that answers ("" for a classifier)."""
        if self.promotion is not None:
            return self.promotion.adapter
        return self.adapter.adapter if self.adapter is not None else ""

    def answered(self, version: int) -> int:
        """The version to tell the caller: the one that ran, or for a promoted adapter the
        bank version whose table routed it there (the caller's versions are the bank's)."""
        return self.bank_version if self.promotion is not None else version

    @property
    def pinned(self) -> bool:
        return self.vocabulary is not None or self.adapter is not None

    @property
    def triton_version(self) -> int:
        """The version to ask Triton for (0: its latest)."""
        return self.version if self.pinned else self.requested

    @property
    def text_scope(self) -> int | str:
        """What the text cache keys this route's prompt embeddings by, beside the text
        encoder: the version (a classifier's text encoder changes with it), or a bank
        adapter's content hash (the same adapter answers alike in every bank version; a
        replaced one has another hash, so it never answers from the old one's cache)."""
        if self.adapter is not None:
            return f"adapter:{self.adapter.lora_sha256 or contract.BASE_ADAPTER}"
        return self.version

    def check_version(self, version: int) -> None:
        """NotFound when a text encoder is asked for a version it does not have ready."""
        text = self.vocabulary.text if self.vocabulary else None
        if text is not None and version not in text.versions:
            raise NotFound(f"text encoder {text.name!r} has no ready version {version} (ready: {list(text.versions)})")


def ready_text_encoder(what: str, owner: str, text_name: str, embedding_dim: int, texts: dict[str, TextEntry],
                       *, per_adapter: bool = False) -> TextEntry | None:
    """The text encoder `text_name` that `what` (a classifier or a bank, `owner`) names, when
    Triton has it ready, it names `owner` back (and takes an adapter per sample, for a bank:
    `per_adapter`) and its embeddings have `embedding_dim`; None (with the reason logged)
    otherwise."""
    text = texts.get(text_name)
    if text is None or text.classifier != owner or (per_adapter and not text.per_adapter):
        log.warning("%s names the text encoder %s, which Triton does not serve for it: no open vocabulary",
                    what, text_name)
        return None
    if text.embedding_dim != embedding_dim:
        log.warning("%s: image embeddings of size %d, text embeddings of size %d: no open vocabulary",
                    what, embedding_dim, text.embedding_dim)
        return None
    return text


def describe_open_vocabulary(name: str, config: dict[str, Any], shape: contract.ClassifierShape,
                             texts: dict[str, TextEntry]) -> OpenVocabulary | None:
    """The classifier's open-vocabulary side, when its config names a ready text encoder
    that names it back; None (with the reason logged) otherwise."""
    text_name = contract.parameter(config, contract.PARAM_TEXT_MODEL)
    if not text_name or shape.embedding_dim is None:
        return None
    text = ready_text_encoder(f"model {name}", name, text_name, shape.embedding_dim, texts)
    if text is None:
        return None
    try:
        scale = float(contract.parameter(config, contract.PARAM_LOGIT_SCALE) or "nan")
        templates = tuple(json.loads(contract.parameter(config, contract.PARAM_TEMPLATES) or "[]"))
    except (ValueError, TypeError) as exc:
        log.warning("model %s has unreadable open-vocabulary parameters (%s): no open vocabulary", name, exc)
        return None
    if not math.isfinite(scale) or scale <= 0 or not templates or not all(isinstance(t, str) for t in templates):
        log.warning("model %s has no usable logit scale or templates: no open vocabulary", name)
        return None
    return OpenVocabulary(text, scale, templates, contract.parameter(config, contract.PARAM_VOCAB_SHA256) or "")
