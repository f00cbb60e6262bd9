"""CLIP's byte-level BPE text tokenizer, without torch or open_clip.

The exported CLIP text encoder takes INT32 token ids of shape ``[77]``; the gateway must
produce exactly the ids ``open_clip.tokenize`` gives (open_clip_torch 3.3.0, the OpenAI
CLIP tokenizer), but the gateway image has no torch and importing open_clip imports it.
This module is an independent implementation of the same algorithm on numpy, ftfy and
regex only:

1. cleaning: ``ftfy.fix_text``, ``html.unescape`` twice, runs of whitespace to one space
   with the ends stripped (Python's ``str.split`` notion of whitespace), then lower case;
2. pre-tokenization with the `regex` module, case-insensitively: the two special tokens
   as whole pieces, the contractions ``'s 't 're 've 'm 'll 'd``, runs of letters
   (``\\p{L}``), single numerals (``\\p{N}``), runs of anything else but whitespace;
3. each piece as UTF-8 bytes, each byte spelled by a printable stand-in character, the
   last one marked with ``</w>``, then merged pairwise by merge rank (lowest first);
4. the vocabulary, built from ``bpe_simple_vocab_16e6.txt.gz``: the 256 byte symbols in
   code-point order, the same with ``</w>``, the first 48,894 merges (the lines after the
   header), then ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407);
5. each text framed by the start and end tokens, cut to the context length with the end
   token kept as the last id, and zero padded.

Subtleties that the tests pin down: a special-token string in the text (after cleaning,
so ``<START_OF_TEXT>`` and the full-width ``＜start_of_text＞`` too) becomes the special
id; a piece the special-token pattern matches only case-insensitively (``<ſtart_of_text>``
with a long s) is one piece that is encoded as plain bytes. The ids depend on the
installed ftfy, regex (its own, newer Unicode tables decide what is a letter) and
Python (``str.lower``, ``str.split``) versions; pin them as open_clip's side does.

Everything is immutable after construction and the caches are thread-safe, so one
tokenizer may serve a whole thread pool (`get_tokenizer` loads each vocabulary once).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import os
import threading
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import ftfy
import numpy as np
import regex

from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

VOCAB_ENV = "CLIPLORA_BPE_VOCAB"
"""Environment variable naming the vocabulary file, instead of open_clip's copy."""

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
"""sha256 of the vocabulary file that OpenAI CLIP and open_clip ship."""

DEFAULT_CONTEXT_LENGTH = 77
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"
MERGE_COUNT = 48_894
"""Merge lines used: open_clip keeps a 49,408-token vocabulary (512 byte symbols, these
merges, two special tokens) and ignores the rest of the file."""

_PIECE_CACHE_SIZE = 1 << 16
_TEXT_CACHE_SIZE = 4096
_TEXT_CACHE_MAX_CHARS = 512
"""Whole texts up to this length are memoised too (prompts repeat); longer ones are not,
so the text cache stays small whatever the callers send."""


def _is_printable_byte(value: int) -> bool:
    """Bytes that stand for themselves: visible ASCII and visible Latin-1 but the soft hyphen."""
    return 0x21 <= value <= 0x7E or 0xA1 <= value <= 0xAC or 0xAE <= value <= 0xFF


def byte_symbols() -> tuple[str, ...]:
    """The stand-in character of every byte value (index = byte).

    Printable bytes are their own Latin-1 character; the 68 others (controls, space,
    NBSP, soft hyphen) get U+0100, U+0101, ... in increasing byte order, so no symbol is
    whitespace or a control character.
    """
    symbols: list[str] = []
    spare = 0x100
    for value in range(256):
        if _is_printable_byte(value):
            symbols.append(chr(value))
        else:
            symbols.append(chr(spare))
            spare += 1
    return tuple(symbols)


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: mojibake and HTML fixed, whitespace collapsed, lower case.

    ``" ".join(text.split())`` both collapses and strips, so the separate ``strip`` calls
    open_clip makes around it change nothing and are left out.
    """
    fixed = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(fixed.split()).lower()


def _piece_pattern(specials: Sequence[str]) -> regex.Pattern[str]:
    """The pre-tokenizer: special tokens whole, contractions, letter runs, single numerals,
    runs of other non-space characters; case-insensitive, as open_clip compiles it."""
    alternatives = [
        *(regex.escape(token) for token in specials),
        r"'(?:s|t|re|ve|m|ll|d)",
        r"\p{L}+",
        r"\p{N}",
        r"[^\s\p{L}\p{N}]+",
    ]
    return regex.compile("|".join(alternatives), regex.IGNORECASE)


def _read_vocab_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(
            f"CLIP BPE vocabulary not found: {path} (point {VOCAB_ENV} at a copy of "
            f"{VOCAB_FILE_NAME}, or unset it to use the copy shipped with cliplora)"
        ) from None
    except IsADirectoryError:
        raise InvalidArgument(f"CLIP BPE vocabulary is a folder, not a file: {path}") from None
    except PermissionError:
        raise PermissionDenied(f"cannot read the CLIP BPE vocabulary: {path}") from None


def _parse_merges(raw: bytes, path: Path) -> list[tuple[str, str]]:
    """The merge pairs in rank order: the `MERGE_COUNT` lines after the header line."""
    try:
        text = gzip.decompress(raw).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"not a gzip-compressed UTF-8 CLIP BPE vocabulary: {path} ({exc})"
        ) from None
    lines = text.split("\n", MERGE_COUNT + 1)[1 : MERGE_COUNT + 1]
    if len(lines) < MERGE_COUNT:
        raise InvalidArgument(
            f"CLIP BPE vocabulary too short: {path} has {len(lines)} merge lines, "
            f"{MERGE_COUNT} needed"
        )
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise InvalidArgument(f"{path}, line {number}: not a merge 'left right': {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _build_vocabulary(symbols: Sequence[str], merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token string -> id, in open_clip's order (see the module docstring)."""
    alphabet = sorted(symbols)
    tokens = [
        *alphabet,
        *(symbol + END_OF_WORD for symbol in alphabet),
        *(left + right for left, right in merges),
        START_OF_TEXT,
        END_OF_TEXT,
    ]
    return {token: index for index, token in enumerate(tokens)}


def _merge_symbols(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Apply BPE: merge the best-ranked adjacent pair everywhere (left to right, without
    overlap), again and again, until no adjacent pair has a rank."""
    while len(symbols) > 1:
        best_rank = -1
        best_pair: tuple[str, str] | None = None
        for pair in zip(symbols, symbols[1:], strict=False):
            rank = ranks.get(pair)
            if rank is not None and (best_pair is None or rank < best_rank):
                best_rank, best_pair = rank, pair
        if best_pair is None:
            break
        left, right = best_pair
        merged: list[str] = []
        position, last = 0, len(symbols) - 1
        while position <= last:
            if position < last and symbols[position] == left and symbols[position + 1] == right:
                merged.append(left + right)
                position += 2
            else:
                merged.append(symbols[position])
                position += 1
        symbols = merged
    return symbols


class ClipTokenizer:
    """CLIP's tokenizer: text to the token ids `open_clip.tokenize` gives, as int32 numpy.

    Build it once (or take the shared one from `get_tokenizer`): loading parses the
    vocabulary. Encoded pieces and short texts are memoised in bounded LRU caches; the
    object is otherwise read-only and may be used from many threads at once.
    """

    def __init__(self, vocab_path: Path | None = None) -> None:
        """Load the vocabulary at `vocab_path` (default: `default_vocab_path()`).

        Raises `NotFound` for a missing file, `InvalidArgument` for one that is not a
        CLIP BPE vocabulary, `PermissionDenied` for one that cannot be read.
        """
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        raw = _read_vocab_bytes(path)
        merges = _parse_merges(raw, path)
        self._path = path
        self._sha256 = hashlib.sha256(raw).hexdigest()
        self._byte_symbols = byte_symbols()
        self._vocabulary = _build_vocabulary(self._byte_symbols, merges)
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._specials = {token: self._vocabulary[token] for token in (START_OF_TEXT, END_OF_TEXT)}
        self._pattern = _piece_pattern(list(self._specials))
        self._piece_ids = functools.lru_cache(maxsize=_PIECE_CACHE_SIZE)(self._encode_piece)
        self._cached_text_ids = functools.lru_cache(maxsize=_TEXT_CACHE_SIZE)(self._encode_text)

    @property
    def vocab_path(self) -> Path:
        """The vocabulary file this tokenizer was loaded from."""
        return self._path

    @property
    def vocab_sha256(self) -> str:
        """sha256 hex digest of the vocabulary file's bytes (to record in an export)."""
        return self._sha256

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49408 for CLIP's vocabulary)."""
        return len(self._vocabulary)

    @property
    def start_token(self) -> int:
        """Id of ``<start_of_text>``, the first id of every row."""
        return self._specials[START_OF_TEXT]

    @property
    def end_token(self) -> int:
        """Id of ``<end_of_text>``, the last non-padding id of every row."""
        return self._specials[END_OF_TEXT]

    @property
    def vocabulary(self) -> Mapping[str, int]:
        """Read-only token string -> id map (byte symbols, ``</w>`` marks word ends)."""
        return MappingProxyType(self._vocabulary)

    def encode(self, text: str) -> list[int]:
        """The token ids of one text, without start and end tokens and without truncation."""
        if len(text) <= _TEXT_CACHE_MAX_CHARS:
            return list(self._cached_text_ids(text))
        return list(self._encode_text(text))

    def __call__(
        self, texts: Sequence[str] | str, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> np.ndarray:
        """Token ids of a batch, int32 of shape ``[len(texts), context_length]``.

        Each row is the start token, the text's ids and the end token, zero padded; a row
        that would be longer keeps its first ``context_length - 1`` ids and ends with the
        end token. A single string is taken as a batch of one, as open_clip does.
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise InvalidArgument(f"context_length must be a positive integer, not {context_length!r}")
        rows = np.zeros((len(texts), context_length), dtype=np.int32)
        for row, text in zip(rows, texts, strict=True):
            ids = self._frame(self.encode(text), context_length)
            row[: len(ids)] = ids
        return rows

    def _frame(self, body: list[int], context_length: int) -> list[int]:
        """Start token, body, end token, cut to `context_length` with the end token last."""
        framed = [self.start_token, *body]
        if len(framed) >= context_length:
            del framed[context_length - 1 :]
        framed.append(self.end_token)
        return framed

    def _encode_text(self, text: str) -> tuple[int, ...]:
        ids: list[int] = []
        for piece in self._pattern.findall(clean_text(text)):
            ids.extend(self._piece_ids(piece))
        return tuple(ids)

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """One pre-tokenized piece: a special token's id, else the ids of its merged bytes."""
        special = self._specials.get(piece)
        if special is not None:
            return (special,)
        try:
            data = piece.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate; ftfy normally replaces them first
            raise InvalidArgument(f"text is not valid Unicode: {piece!r}") from None
        symbols = [self._byte_symbols[value] for value in data]
        symbols[-1] += END_OF_WORD
        return tuple(self._vocabulary[symbol] for symbol in _merge_symbols(symbols, self._ranks))

    def __repr__(self) -> str:
        return f"ClipTokenizer(vocab_path={str(self._path)!r}, vocab_size={self.vocab_size})"


PACKAGED_VOCAB = Path(__file__).parent / "data" / VOCAB_FILE_NAME
"""CLIP's vocabulary, shipped with cliplora (OpenAI CLIP's file, MIT licence; its sha256
is `CLIP_VOCAB_SHA256`), so that the gateway needs neither torch nor open_clip."""


def default_vocab_path() -> Path:
    """The vocabulary file: ``$CLIPLORA_BPE_VOCAB`` if set (and not empty), else the copy
    shipped with cliplora, checked against `CLIP_VOCAB_SHA256`.

    Raises `NotFound` when the named file does not exist, `FailedPrecondition` when the
    shipped copy is missing or altered (a broken installation).
    """
    override = os.environ.get(VOCAB_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise NotFound(f"{VOCAB_ENV}={override!r} is not a file: point it at a copy of {VOCAB_FILE_NAME}, "
                           "or unset it to use the copy shipped with cliplora")
        return path
    try:
        digest = hashlib.sha256(PACKAGED_VOCAB.read_bytes()).hexdigest()
    except OSError as exc:
        raise FailedPrecondition(f"the CLIP BPE vocabulary shipped with cliplora cannot be read ({exc}): "
                                 f"reinstall cliplora, or set {VOCAB_ENV}") from None
    if digest != CLIP_VOCAB_SHA256:
        raise FailedPrecondition(f"the CLIP BPE vocabulary shipped with cliplora ({PACKAGED_VOCAB}) has sha256 "
                                 f"{digest[:12]}..., not CLIP's {CLIP_VOCAB_SHA256[:12]}...: reinstall cliplora")
    return PACKAGED_VOCAB


_TOKENIZERS: dict[Path, ClipTokenizer] = {}
_TOKENIZERS_LOCK = threading.Lock()


def get_tokenizer(vocab_path: Path | None = None) -> ClipTokenizer:
    """The shared tokenizer for a vocabulary file (default: `default_vocab_path()`),
    loaded once per resolved path, also when many threads ask at once."""
    path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
    key = path.resolve()
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        with _TOKENIZERS_LOCK:
            tokenizer = _TOKENIZERS.get(key)
            if tokenizer is None:
                tokenizer = ClipTokenizer(key)
                _TOKENIZERS[key] = tokenizer
    return tokenizer
